// Saving the analysis: JSON (the API's answers as received), CSV (one row per face) and
// one self-contained HTML file (the boxed images inlined). Built in the browser: the
// server writes nothing.
'use strict';

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

