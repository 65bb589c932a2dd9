// The UniFER page: images in (drop or pick), every face boxed, numbered and read; reports
// saved as JSON / CSV / one self-contained HTML file; a webcam mode with live labels.
// Plain JavaScript, no libraries: it talks only to the server that served it
// (POST /api/analyze, GET /api/health). State for tests and curious users: window.unifer.
'use strict';

const BASIC_COLORS = {
  neutral: '#8d99ae', happiness: '#f4a261', sadness: '#457b9d', surprise: '#e9c46a',
  fear: '#7b2cbf', disgust: '#2a9d8f', anger: '#d62828', contempt: '#6d597a',
};
const BOX_COLORS = ['#e63946', '#1d7bd6', '#2a9d48', '#f28c00', '#8e44ad', '#00a6a6',
                    '#c2185b', '#6d4c41'];
const WINDOW_S = 60;          // the webcam timeline's span
const state = { results: [], errors: [], stream: null };
window.unifer = state;

const $ = (id) => document.getElementById(id);
const fmt = (x, d = 2) => (x === null || x === undefined ? null : Number(x).toFixed(d));
const boxColor = (i) => BOX_COLORS[i % BOX_COLORS.length];

// Build DOM from data with textContent only: file names and model text never become markup.
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

// ---- the model ------------------------------------------------------------------------

async function showModel() {
  try {
    const r = await fetch('/api/health');
    const h = await r.json();
    const m = h.model;
    $('model').textContent = `model: ${m.kind} (${m.backend} back end) from ${m.path}` +
      (m.backend === 'student' ? ' - the action units and written rationale need --backend full' : '');
    state.health = h;
  } catch (e) {
    $('model').textContent = 'the unifer server does not answer';
  }
}

// ---- images ---------------------------------------------------------------------------

async function analyse(file, query = '') {
  const form = new FormData();
  form.append('file', file, file.name || 'frame.jpg');
  const r = await fetch('/api/analyze' + query, { method: 'POST', body: form });
  let body;
  try { body = await r.json(); } catch (e) { body = { error: `the server answered ${r.status}` }; }
  if (!r.ok) throw new Error(body.error || `the server answered ${r.status}`);
  return body;
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error('the browser cannot show this image'));
    img.src = url;
  });
}

function drawFaces(ctx, faces, scale, { labels = false } = {}) {
  const lw = Math.max(2, Math.round(3 * scale));
  ctx.font = `bold ${Math.max(12, Math.round(16 * scale))}px system-ui, sans-serif`;
  ctx.textBaseline = 'top';
  faces.forEach((f, i) => {
    const n = f.track ?? i + 1;
    const [x0, y0, x1, y1] = f.box;
    ctx.strokeStyle = ctx.fillStyle = boxColor(n - 1);
    ctx.lineWidth = lw;
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    const tag = labels ? `${n} ${f.label} ${fmt(f.basic[f.label])}` : String(n);
    const pad = 3 * scale, w = ctx.measureText(tag).width + 2 * pad;
    const h = Math.max(12, Math.round(16 * scale)) + 2 * pad;
    const ty = y0 - h >= 0 ? y0 - h : y0;
    ctx.fillRect(x0 - lw / 2, ty, w, h);
    ctx.fillStyle = '#fff';
    ctx.fillText(tag, x0 - lw / 2 + pad, ty + pad);
  });
}

function bars(probs, colors = BASIC_COLORS) {
  const rows = Object.entries(probs).map(([name, p]) => {
    const fill = el('i');
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    fill.style.background = colors[name] || '#888';
    return [el('span', { text: name }), el('div', { class: 'bar' }, fill),
            el('span', { text: `${(100 * p).toFixed(1)}%` })];
  });
  return el('div', { class: 'bars' }, rows);
}

function circumplex(v, a) {
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', '0 0 120 120');
  svg.setAttribute('width', '120');
  svg.setAttribute('class', 'circumplex');
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, val] of Object.entries(attrs)) n.setAttribute(k, val);
    if (text) n.textContent = text;
    svg.append(n);
  };
  add('circle', { cx: 60, cy: 60, r: 48, fill: '#f6f7fa', stroke: '#c5ccd8' });
  add('line', { x1: 12, y1: 60, x2: 108, y2: 60, stroke: '#c5ccd8' });
  add('line', { x1: 60, y1: 12, x2: 60, y2: 108, stroke: '#c5ccd8' });
  add('text', { x: 108, y: 72, 'text-anchor': 'end' }, 'pleasant');
  add('text', { x: 12, y: 72 }, 'unpleasant');
  add('text', { x: 63, y: 19 }, 'aroused');
  add('text', { x: 63, y: 106 }, 'calm');
  if (v !== null && v !== undefined && a !== null && a !== undefined) {
    add('circle', { cx: 60 + 48 * v, cy: 60 - 48 * a, r: 5, fill: '#d62828', class: 'va-dot' });
  }
  return svg;
}

function facePanel(f, i) {
  const n = f.track ?? i + 1;
  const num = el('span', { class: 'num', text: String(n) });
  num.style.background = boxColor(n - 1);
  const absent = f.absent || {};
  const p = f.basic[f.label];
  const intensity = el('span', { class: 'meter' }, el('i'));
  if (f.intensity !== null) intensity.firstChild.style.width = `${100 * f.intensity}%`;
  const rationale = f.rationale && f.rationale.action_units
    ? el('dd', { class: 'aus' }, f.rationale.action_units.join(', '))
    : el('dd', { class: 'absent', text: absent.rationale ? `not available: ${absent.rationale}`
                                                         : 'not given' });
  const unc = f.uncertainty;
  const stated = unc.stated
    ? ` - the model says ${Object.entries(unc.stated).map(([k, s]) => `${k} ${fmt(s)}`).join(', ')}`
    : '';
  const facts = el('dl', {},
    el('dt', { text: 'compound expression' }), el('dd', { class: 'compound', text: f.compound.label ?? 'not given' }),
    el('dt', { text: 'intensity' }),
    el('dd', {}, intensity, ` ${f.intensity === null ? 'not given' : fmt(f.intensity)}`),
    el('dt', { text: 'valence / arousal' }),
    el('dd', { text: f.valence === null ? 'not given' : `${fmt(f.valence)} / ${fmt(f.arousal)}` }),
    el('dt', { text: 'action units' }), rationale,
    el('dt', { text: 'uncertainty' }),
    el('dd', { text: `entropy ${fmt(unc.entropy)}, top-2 margin ${fmt(unc.margin)}${stated}` }));
  const panel = el('div', { class: 'face', 'data-face': String(n) },
    el('h3', {}, num, `${f.label} `, el('small', { text: `${(100 * p).toFixed(0)}%` })),
    bars(f.basic),
    el('div', { class: 'facts' }, facts, circumplex(f.valence, f.arousal)));
  if (f.rationale && f.rationale.text) {
    panel.append(el('p', { class: 'rationale', text: `"${f.rationale.text}"` }));
  }
  return panel;
}

async function showResult(file, answer) {
  const url = URL.createObjectURL(file);
  const img = await loadImage(url);
  const canvas = el('canvas');
  canvas.width = answer.width;
  canvas.height = answer.height;
  const ctx = canvas.getContext('2d');
  ctx.drawImage(img, 0, 0, answer.width, answer.height);
  drawFaces(ctx, answer.faces, Math.max(answer.width, answer.height) / 420);
  URL.revokeObjectURL(url);
  const n = answer.faces.length;
  const card = el('article', { class: 'result' },
    el('h2', {}, file.name, el('small', { text: `  ${n} face${n === 1 ? '' : 's'}, ` +
                                                `${answer.width} x ${answer.height}, ${answer.ms} ms` })),
    canvas, el('div', { class: 'faces' }, answer.faces.map(facePanel)));
  $('results').prepend(card);
  state.results.push({ name: file.name, answer, canvas });
  updateToolbar();
}

function showError(name, message) {
  state.errors.push({ name, error: message });
  $('errors').append(el('div', { class: 'error', text: `${name}: ${message}` }));
}

async function handleFiles(files) {
  const limit = state.health ? state.health.limits.max_bytes : Infinity;
  for (const file of files) {
    if (file.size > limit) {   // the server would refuse it too, after the upload
      showError(file.name, `the file is ${(file.size / 2 ** 20).toFixed(1)} MB; the limit is ` +
                           `${(limit / 2 ** 20).toFixed(0)} MB`);
      continue;
    }
    try {
      const answer = await analyse(file);
      await showResult(file, answer);
    } catch (e) {
      showError(file.name, e.message);
    }
  }
}

function updateToolbar() {
  const faces = state.results.reduce((s, r) => s + r.answer.faces.length, 0);
  $('toolbar').hidden = state.results.length === 0;
  $('summary').textContent = `${state.results.length} image${state.results.length === 1 ? '' : 's'}, ` +
                             `${faces} face${faces === 1 ? '' : 's'}`;
}

// ---- saving ---------------------------------------------------------------------------

function download(name, type, text) {
  const a = el('a', { download: name });
  a.href = URL.createObjectURL(new Blob([text], { type }));
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

const stamp = () => new Date().toISOString().slice(0, 19).replace(/[:T]/g, '-');

function saveJSON() {
  download(`unifer-${stamp()}.json`, 'application/json',
           JSON.stringify(state.results.map((r) => r.answer), null, 1));
}

function csvCell(v) {
  const s = v === null || v === undefined ? '' : String(v);
  return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

function saveCSV() {
  const labels = state.results.length ? Object.keys(state.results[0].answer.faces[0].basic) : [];
  const head = ['image', 'face', 'x0', 'y0', 'x1', 'y1', 'label', ...labels.map((l) => `p_${l}`),
                'compound', 'intensity', 'valence', 'arousal', 'entropy', 'margin',
                'action_units', 'rationale'];
  const rows = [head];
  for (const r of state.results) {
    r.answer.faces.forEach((f, i) => {
      rows.push([r.name, i + 1, ...f.box, f.label, ...labels.map((l) => f.basic[l]),
                 f.compound.label, f.intensity, f.valence, f.arousal, f.uncertainty.entropy,
                 f.uncertainty.margin, f.rationale?.action_units?.join('; ') ?? '',
                 f.rationale?.text ?? '']);
    });
  }
  download(`unifer-${stamp()}.csv`, 'text/csv', rows.map((r) => r.map(csvCell).join(',')).join('\n') + '\n');
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;',
                                                  '"': '&quot;', "'": '&#39;' }[c]));
}

function saveHTML() {
  const parts = state.results.map((r) => {
    const faces = r.answer.faces.map((f, i) => {
      const probs = Object.entries(f.basic).map(([k, p]) =>
        `<tr><td>${escapeHtml(k)}</td><td><div class="bar"><i style="width:${(100 * p).toFixed(1)}%;` +
        `background:${BASIC_COLORS[k] || '#888'}"></i></div></td><td>${(100 * p).toFixed(1)}%</td></tr>`).join('');
      const aus = f.rationale?.action_units?.join(', ') ??
                  (f.absent?.rationale ? `not available: ${f.absent.rationale}` : 'not given');
      return `<div class="face"><h3>${i + 1}. ${escapeHtml(f.label)}</h3><table>${probs}</table>` +
        `<p>compound: <b>${escapeHtml(f.compound.label ?? 'not given')}</b><br>` +
        `intensity: ${fmt(f.intensity) ?? 'not given'}<br>valence / arousal: ` +
        `${fmt(f.valence) ?? 'not given'} / ${fmt(f.arousal) ?? 'not given'}<br>` +
        `action units: ${escapeHtml(aus)}<br>uncertainty: entropy ${fmt(f.uncertainty.entropy)}, ` +
        `margin ${fmt(f.uncertainty.margin)}</p>` +
        (f.rationale?.text ? `<p><i>${escapeHtml(f.rationale.text)}</i></p>` : '') + '</div>';
    }).join('');
    return `<section><h2>${escapeHtml(r.name)}</h2><img alt="${escapeHtml(r.name)}" src="` +
      `${r.canvas.toDataURL('image/jpeg', 0.88)}"><div class="faces">${faces}</div></section>`;
  }).join('');
  const model = state.health ? escapeHtml(`${state.health.model.kind} from ${state.health.model.path}`) : '';
  const html = `<!doctype html><html><head><meta charset="utf-8"><title>UniFER report</title><style>
body{font:14px system-ui,sans-serif;margin:24px;color:#1d2430}section{margin-bottom:28px}
img{max-width:520px;display:block;margin:8px 0}.faces{display:flex;flex-wrap:wrap;gap:12px}
.face{border:1px solid #d9dee7;border-radius:8px;padding:8px 12px;width:320px}
.bar{width:160px;height:9px;background:#edf0f5}.bar i{display:block;height:100%}td{font-size:12px}
</style></head><body><h1>UniFER report</h1><p>${new Date().toLocaleString()} &middot; ${model}</p>` +
    `${parts}<script type="application/json" id="data">` +
    `${JSON.stringify(state.results.map((r) => r.answer)).replace(/</g, '\\u003c')}</script></body></html>`;
  download(`unifer-${stamp()}.html`, 'text/html', html);
}

// ---- webcam ---------------------------------------------------------------------------

const cam = { running: false, media: null, frames: 0, times: [], history: [], started: 0 };

function setTab(name) {
  for (const t of ['images', 'webcam']) {
    $(t).hidden = t !== name;
    $(`tab-${t}`).classList.toggle('active', t === name);
  }
}

async function startCamera() {
  $('cam-error').textContent = '';
  try {
    cam.media = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false });
  } catch (e) {
    $('cam-error').append(el('div', { class: 'error', text: `no camera: ${e.message}` }));
    return;
  }
  const video = $('video');
  video.srcObject = cam.media;
  await video.play();
  Object.assign(cam, { running: true, frames: 0, times: [], history: [], started: performance.now(),
                       id: Math.random().toString(36).slice(2, 12), errors: 0 });
  state.stream = { frames: 0, fps: 0, meanFps: 0, faces: [], labelled: 0 };
  $('cam-start').disabled = true;
  $('cam-stop').disabled = false;
  cameraLoop();
}

function stopCamera() {
  cam.running = false;
  if (cam.media) cam.media.getTracks().forEach((t) => t.stop());
  $('cam-start').disabled = false;
  $('cam-stop').disabled = true;
}

// Two frames in flight: the browser grabs and encodes the next frame while the server
// analyses the last one (the server takes a stream's frames one at a time, in order).
const IN_FLIGHT = 2;

async function grabFrame(video, canvas) {
  while (!video.videoWidth || !video.videoHeight) await new Promise((r) => setTimeout(r, 50));
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext('2d').drawImage(video, 0, 0, canvas.width, canvas.height);
  const blob = await new Promise((r) => canvas.toBlob(r, 'image/jpeg', 0.8));
  return new File([blob], 'frame.jpg', { type: 'image/jpeg' });
}

async function cameraLoop() {
  const video = $('video');
  const grab = document.createElement('canvas');
  const pending = new Set();
  let sent = 0;
  cam.shown = 0;
  while (cam.running) {
    if (pending.size >= IN_FLIGHT) {
      await Promise.race(pending);
      continue;
    }
    const frame = await grabFrame(video, grab);
    if (!cam.running) break;
    const n = ++sent;
    const request = analyse(frame, `?stream=${cam.id}`).then((answer) => {
      cam.errors = 0;
      if (cam.running && n > cam.shown) {
        cam.shown = n;
        showFrame(answer);
      }
    }, (e) => {
      $('cam-error').replaceChildren(el('div', { class: 'error', text: `frame not analysed: ${e.message}` }));
      if (++cam.errors >= 5) stopCamera();
      return new Promise((r) => setTimeout(r, 200));
    }).finally(() => pending.delete(request));
    pending.add(request);
  }
}

function showFrame(answer) {
  const now = performance.now();
  cam.frames += 1;
  cam.times.push(now);
  while (cam.times.length && now - cam.times[0] > 2000) cam.times.shift();
  const fps = cam.times.length > 1 ? 1000 * (cam.times.length - 1) / (now - cam.times[0]) : 0;
  const s = state.stream;
  s.frames = cam.frames;
  s.fps = fps;
  s.meanFps = 1000 * cam.frames / (now - cam.started);
  s.faces = answer.faces;
  if (answer.faces.length) s.labelled += 1;
  $('frames').textContent = String(cam.frames);
  $('fps').textContent = fps.toFixed(1);

  const overlay = $('overlay');
  overlay.width = answer.width;
  overlay.height = answer.height;
  const ctx = overlay.getContext('2d');
  ctx.clearRect(0, 0, overlay.width, overlay.height);
  drawFaces(ctx, answer.faces, Math.max(answer.width, answer.height) / 640, { labels: true });

  $('live').replaceChildren(...answer.faces.map((f) => el('li', { value: String(f.track) },
    el('b', { text: f.label }), ` ${fmt(f.basic[f.label])} - ${f.compound.label ?? ''}` +
    (f.valence === null ? '' : ` - valence ${fmt(f.valence)}, arousal ${fmt(f.arousal)}`))));

  const first = answer.faces.reduce((a, f) => (a === null || f.track < a.track ? f : a), null);
  cam.history.push({ t: now, basic: first ? first.basic : null });
  while (cam.history.length && now - cam.history[0].t > WINDOW_S * 1000) cam.history.shift();
  drawTimeline(now);
}

function drawTimeline(now) {
  const c = $('timeline'), ctx = c.getContext('2d');
  const W = c.width, H = c.height - 14;
  ctx.clearRect(0, 0, c.width, c.height);
  const step = Math.max(1, W / (WINDOW_S * 12));
  for (const h of cam.history) {
    const x = W - (now - h.t) / (WINDOW_S * 1000) * W;
    if (!h.basic) continue;
    let y = H;
    for (const [name, p] of Object.entries(h.basic)) {
      ctx.fillStyle = BASIC_COLORS[name] || '#888';
      ctx.fillRect(x, y - p * H, step + 0.5, p * H);
      y -= p * H;
    }
  }
  ctx.fillStyle = '#5b6678';
  ctx.font = '10px system-ui, sans-serif';
  ctx.fillText(`-${WINDOW_S} s`, 2, c.height - 2);
  ctx.fillText('now', W - 20, c.height - 2);
}

// ---- wiring ---------------------------------------------------------------------------

function init() {
  const drop = $('drop');
  $('file-input').addEventListener('change', (e) => {
    handleFiles([...e.target.files]);
    e.target.value = '';
  });
  for (const ev of ['dragenter', 'dragover']) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add('over'); });
  }
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    handleFiles([...e.dataTransfer.files]);
  });
  // A file dropped beside the zone must not navigate away from the page.
  window.addEventListener('dragover', (e) => e.preventDefault());
  window.addEventListener('drop', (e) => e.preventDefault());
  $('save-json').addEventListener('click', saveJSON);
  $('save-csv').addEventListener('click', saveCSV);
  $('save-html').addEventListener('click', saveHTML);
  $('clear').addEventListener('click', () => {
    state.results = [];
    state.errors = [];
    $('results').replaceChildren();
    $('errors').replaceChildren();
    updateToolbar();
  });
  $('tab-images').addEventListener('click', () => setTab('images'));
  $('tab-webcam').addEventListener('click', () => setTab('webcam'));
  $('cam-start').addEventListener('click', startCamera);
  $('cam-stop').addEventListener('click', stopCamera);
  $('legend').replaceChildren(...Object.entries(BASIC_COLORS).map(([name, color]) => {
    const swatch = el('i');
    swatch.style.background = color;
    return el('span', {}, swatch, name);
  }));
  showModel();
}

init();
