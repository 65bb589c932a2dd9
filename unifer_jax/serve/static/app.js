// The UniFER page: images in (drop or pick), every face boxed, numbered and read.
// Plain JavaScript, no libraries, three files sharing these globals: this one (helpers,
// images, wiring), reports.js (save JSON / CSV / one self-contained HTML file) and
// webcam.js (live labels and the last minute's timeline). It talks only to the server
// that served it (POST /api/analyze, GET /api/health). State for tests: window.unifer.
'use strict';

const BASIC_COLORS = {
  neutral: '#8d99ae', happiness: '#f4a261', sadness: '#457b9d', surprise: '#e9c46a',
  fear: '#7b2cbf', disgust: '#2a9d8f', anger: '#d62828', contempt: '#6d597a',
};
const BOX_COLORS = ['#e63946', '#1d7bd6', '#2a9d48', '#f28c00', '#8e44ad', '#00a6a6',
                    '#c2185b', '#6d4c41'];
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
    if (m.backend === 'full') {
      $('cam-note').textContent = 'The full model takes seconds a frame: for live labels start ' +
                                  'the server with an exported student (--backend student).';
    }
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

// ---- wiring ---------------------------------------------------------------------------

function setTab(name) {
  for (const t of ['images', 'webcam']) {
    $(t).hidden = t !== name;
    $(`tab-${t}`).classList.toggle('active', t === name);
  }
}

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

document.addEventListener('DOMContentLoaded', init);
