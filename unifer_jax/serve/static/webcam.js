// The webcam mode: frames from getUserMedia go to POST /api/analyze?stream=ID (the
// server tracks faces across a stream's frames); boxes and labels are drawn over the
// video, and face 1's basic-label probabilities over the last minute below it.
'use strict';

const WINDOW_S = 60;          // the timeline's span
const cam = { running: false, media: null, frames: 0, times: [], history: [], started: 0 };

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

