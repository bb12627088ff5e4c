// login-metrics dashboard: polls /api/status and /api/packets on this origin
// and draws the tables and SVG charts itself. No library, nothing loaded from
// elsewhere. Values from packets are only ever set as text (textContent),
// never parsed as HTML: they come from login events, which anyone can send.
'use strict';
(function () {
  const RECENT = 30;     // packets (windows) the page shows
  const TOP = 10;        // rows per table
  const STATUS_MS = 2000;
  const WAIT_S = 25;     // how long a packet request may wait for a new packet
  const PACKETS_PAUSE_MS = 1000; // between packet requests: bursts come as one
  const COLORS = ['#2f6fdf', '#d9480f', '#2b8a3e', '#ae3ec9', '#e67700', '#0c8599', '#c2255c', '#5c7cfa', '#74b816'];
  const SVG_NS = 'http://www.w3.org/2000/svg';

  // Opened as /?token=..., the page's own API calls carry the token, in the
  // Authorization header (not in their URLs).
  const token = new URLSearchParams(location.search).get('token');
  const headers = token ? { Authorization: 'Bearer ' + token } : {};

  let status = null;
  let packets = [];   // newest first, at most RECENT
  let seq = 0;        // sequence number of the newest packet held
  let selected = null; // { slice: 'user_id+ip', key: '["a","b"]' }
  let updates = 0;    // answers that brought new packets, since the page loaded

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) e.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : String(c));
    }
    return e;
  }

  function svgEl(tag, attrs, ...children) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : String(c));
    }
    return e;
  }

  class Unauthorized extends Error {}

  async function getJson(path) {
    const r = await fetch(path, { headers, cache: 'no-store' });
    if (r.status === 401) throw new Unauthorized();
    if (!r.ok) throw new Error(path + ': HTTP ' + r.status);
    return { body: await r.json(), response: r };
  }

  const num = (n) => (n === null || n === undefined) ? '–' : Number(n).toLocaleString('en-US');
  const sliceKey = (fields) => fields.join('+');
  const sliceName = (fields) => fields.join(' + ');

  function timeOf(iso) {
    if (!iso) return '–';
    const d = new Date(iso);
    return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false });
  }

  function ago(seconds) {
    if (seconds < 0) seconds = 0;
    if (seconds < 90) return Math.round(seconds) + ' s ago';
    if (seconds < 5400) return Math.round(seconds / 60) + ' min ago';
    return Math.round(seconds / 3600) + ' h ago';
  }

  // The label of a packet on a chart's axis: its window (or batch) start.
  function packetLabel(p) {
    const w = p.window || {};
    const t = timeOf(w.start || w.ts_min || p.emitted_at);
    return w.pane ? t + ' #' + w.pane : t;
  }

  function rowValues(fields, row) {
    return fields.map((f) => (row[f] === null || row[f] === undefined) ? null : String(row[f]));
  }

  // ---- status ---------------------------------------------------------------

  function renderStatus() {
    const s = status;
    const badge = $('state');
    badge.textContent = s.state_text;
    badge.className = 'badge state-' + s.state;
    const mode = s.mode === 'window' ? 'window mode, ' + s.window_seconds + ' s windows' : 'arrival mode';
    $('config').textContent = s.input_topic + ' → ' + s.output_topic + ' · ' + mode + ' · v' + s.version;

    $('v-rate').textContent = s.events_per_second === null ? '–' : num(s.events_per_second);
    $('s-rate').textContent = s.rate_seconds === null ? 'events/s' : 'events/s over ' + s.rate_seconds + ' s';
    $('v-lag').textContent = num(s.consumer_lag);
    $('s-lag').textContent = s.state === 'stopped'
      ? 'messages behind, when last measured'
      : 'messages behind · ' + s.assigned_partitions + ' partitions assigned';
    $('v-packets').textContent = num(s.packets);
    $('s-packets').textContent = 'published · ' + s.packets_kept + ' kept here (of ' + s.packets_capacity + ')';
    const latest = s.latest_packet;
    if (latest) {
      $('v-latest').textContent = timeOf(latest.emitted_at);
      const age = (Date.parse(s.now) - Date.parse(latest.emitted_at)) / 1000;
      $('s-latest').textContent = ago(age) + ' · closed by ' + latest.closed_by;
    } else {
      $('v-latest').textContent = '–';
      $('s-latest').textContent = 'none yet';
    }
    $('v-events').textContent = num(s.events);
    $('s-events').textContent = 'consumed · ' + num(s.invalid) + ' invalid · ' + num(s.late) + ' late';

    const pseudo = s.pseudonymized || [];
    $('privacy').textContent = pseudo.length
      ? 'Values are shown as packets publish them. Pseudonymized (keyed HMAC): ' + pseudo.join(', ') +
        '. Other fields, such as user ids, are shown as they arrive and may be personal data.'
      : 'Values are shown as packets publish them: user ids, IP addresses and device ids are personal data. ' +
        'None is pseudonymized (privacy.pseudonymize).';
  }

  // ---- charts ---------------------------------------------------------------

  // A chart of `series` ({name, color, values}) over `labels`, as bars (one
  // series) or lines with points. Hand-written SVG whose viewBox is the box's
  // width in pixels, so text keeps its size on a phone and on a wide screen
  // (charts are drawn again when the window is resized).
  function chart(container, labels, series, kind) {
    container.replaceChildren();
    if (!labels.length) {
      container.append(el('div', { class: 'empty' }, 'No packets yet.'));
      return;
    }
    const W = Math.max(260, Math.round(container.clientWidth || 640));
    const H = kind === 'bars' ? 160 : 190, L = 52, R = 10, T = 10, B = 26;
    const pw = W - L - R, ph = H - T - B;
    let max = 1;
    for (const s of series) for (const v of s.values) if (v !== null && v > max) max = v;
    const step = niceStep(max / 4);
    const top = Math.ceil(max / step) * step;
    const y = (v) => T + ph - (v / top) * ph;
    const n = labels.length;
    const slot = pw / n;
    const x = (i) => L + slot * (i + 0.5);
    const svg = svgEl('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': container.parentElement.querySelector('figcaption').textContent });
    for (let v = 0; v <= top + 1e-9; v += step) {
      svg.append(svgEl('line', { class: 'grid', x1: L, x2: W - R, y1: y(v), y2: y(v) }));
      svg.append(svgEl('text', { x: L - 6, y: y(v) + 4, 'text-anchor': 'end' }, num(Math.round(v))));
    }
    svg.append(svgEl('line', { class: 'axis', x1: L, x2: W - R, y1: T + ph, y2: T + ph }));
    const every = Math.max(1, Math.ceil(n / Math.max(2, Math.floor(pw / 80))));
    labels.forEach((label, i) => {
      if (i % every === 0 || i === n - 1) {
        svg.append(svgEl('text', { x: x(i), y: H - 8, 'text-anchor': 'middle' }, label));
      }
    });
    if (kind === 'bars') {
      const s = series[0];
      const bw = Math.max(2, slot * 0.7);
      s.values.forEach((v, i) => {
        if (v === null) return;
        svg.append(svgEl('rect', { x: x(i) - bw / 2, y: y(v), width: bw, height: Math.max(0, T + ph - y(v)), fill: s.color, rx: 1.5 },
          svgEl('title', {}, labels[i] + ' — ' + s.name + ': ' + num(v))));
      });
    } else {
      for (const s of series) {
        const pts = [];
        s.values.forEach((v, i) => { if (v !== null) pts.push([x(i), y(v), v, i]); });
        if (pts.length > 1) {
          svg.append(svgEl('polyline', { points: pts.map((p) => p[0].toFixed(1) + ',' + p[1].toFixed(1)).join(' '), fill: 'none', stroke: s.color, 'stroke-width': 2, 'stroke-linejoin': 'round' }));
        }
        for (const [px, py, v, i] of pts) {
          svg.append(svgEl('circle', { cx: px, cy: py, r: 3, fill: s.color },
            svgEl('title', {}, labels[i] + ' — ' + s.name + ': ' + num(v))));
        }
      }
    }
    container.append(svg);
  }

  function niceStep(raw) {
    if (raw <= 1) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    const f = raw / p;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
  }

  function legend(container, series) {
    container.replaceChildren(...series.map((s) => {
      const item = el('span', {}, s.name);
      item.style.setProperty('--swatch', s.color);
      return item;
    }));
  }

  function renderCharts() {
    const old = packets.slice().reverse(); // oldest first
    const labels = old.map(packetLabel);
    chart($('chart-valid'), labels, [{ name: 'valid events', color: COLORS[0], values: old.map((p) => p.events.valid) }], 'bars');
    const bad = [
      { name: 'invalid', color: '#c0392b', values: old.map((p) => p.events.invalid) },
      { name: 'late', color: '#e67700', values: old.map((p) => (p.events.late === undefined ? null : p.events.late)) },
    ].filter((s) => s.values.some((v) => v !== null));
    chart($('chart-bad'), labels, bad, 'lines');
    legend($('legend-bad'), bad);
    const slices = configuredSlices();
    const dups = slices.map((fields, i) => ({
      name: sliceName(fields),
      color: COLORS[i % COLORS.length],
      values: old.map((p) => {
        const m = (p.metrics || []).find((m) => sliceKey(m.slice) === sliceKey(fields));
        return m ? m.duplicate_groups : null;
      }),
    }));
    chart($('chart-dups'), labels, dups, 'lines');
    legend($('legend-dups'), dups);
  }

  // ---- slices ---------------------------------------------------------------

  // The configured slices, then any other a packet reports (a packet from
  // before a configuration change).
  function configuredSlices() {
    const out = (status && status.slices) ? status.slices.slice() : [];
    const seen = new Set(out.map(sliceKey));
    for (const p of packets) {
      for (const m of p.metrics || []) {
        if (!seen.has(sliceKey(m.slice))) { seen.add(sliceKey(m.slice)); out.push(m.slice); }
      }
    }
    return out;
  }

  // Rows of the latest packet and summed over the recent ones, per slice.
  function sliceData(fields) {
    const key = sliceKey(fields);
    const latestPacket = packets[0];
    const latest = latestPacket && (latestPacket.metrics || []).find((m) => sliceKey(m.slice) === key);
    const sums = new Map();
    let windows = 0;
    for (const p of packets) {
      const m = (p.metrics || []).find((m) => sliceKey(m.slice) === key);
      if (!m) continue;
      windows += 1;
      for (const row of m.duplicates) {
        const values = rowValues(fields, row);
        const k = JSON.stringify(values);
        const e = sums.get(k) || { values, count: 0, windows: 0 };
        e.count += row.count;
        e.windows += 1;
        sums.set(k, e);
      }
    }
    const recent = [...sums.values()].sort((a, b) => b.count - a.count || (JSON.stringify(a.values) < JSON.stringify(b.values) ? -1 : 1));
    return { latest, recent, windows };
  }

  // Short values (IPs, versions, device ids) keep to one line; long ones
  // (user ids, pseudonyms) wrap.
  function valueCell(v) {
    if (v === null) return el('td', { class: 'null' }, '(null)');
    return el('td', v.length <= 20 ? { class: 'short' } : {}, v);
  }

  function rowElement(fields, key, values, cells) {
    const k = JSON.stringify(values);
    const tr = el('tr', { tabindex: '0', 'data-key': k, title: 'Show this combination over the recent windows' },
      ...values.map(valueCell), ...cells);
    if (selected && selected.slice === key && selected.key === k) tr.classList.add('selected');
    const choose = () => {
      selected = (selected && selected.slice === key && selected.key === k) ? null : { slice: key, key: k };
      renderSlices();
    };
    tr.addEventListener('click', choose);
    tr.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); choose(); } });
    return tr;
  }

  function table(cls, caption, fields, extraHeads, rows) {
    return el('table', { class: 'top ' + cls },
      el('caption', {}, caption),
      el('thead', {}, el('tr', {}, ...fields.map((f) => el('th', {}, f)), ...extraHeads)),
      el('tbody', {}, ...rows));
  }

  function renderSlices() {
    const root = $('slices');
    const cards = configuredSlices().map((fields) => {
      const key = sliceKey(fields);
      const { latest, recent, windows } = sliceData(fields);
      const card = el('section', { class: 'slice', 'data-slice': key },
        el('h2', {}, sliceName(fields)));
      if (!packets.length) {
        card.append(el('p', { class: 'empty' }, 'No packets yet.'));
        return card;
      }
      card.append(el('p', { class: 'meta' }, latest
        ? `Latest ${packets[0].window.start ? 'window' : 'batch'}: ${num(latest.duplicate_groups)} repeated of ${num(latest.groups)} combinations` +
          (latest.truncated ? ` (top ${num(latest.duplicates.length)} reported)` : '')
        : 'Not in the latest packet.'));
      const latestRows = latest ? latest.duplicates.slice(0, TOP).map((row) => {
        const values = rowValues(fields, row);
        return rowElement(fields, key, values, [el('td', { class: 'count' }, num(row.count))]);
      }) : [];
      const none = (columns) => [el('tr', { class: 'none' }, el('td', { colspan: columns }, 'none repeated'))];
      const recentRows = recent.slice(0, TOP).map((e) =>
        rowElement(fields, key, e.values, [el('td', { class: 'windows' }, e.windows), el('td', { class: 'count' }, num(e.count))]));
      const tables = el('div', { class: 'tables' },
        table('latest', 'Latest ' + (packets[0].window.start ? 'window' : 'batch') + ' · ' + packetLabel(packets[0]), fields,
          [el('th', { class: 'count' }, 'count')], latestRows.length ? latestRows : none(fields.length + 1)),
        table('recent', `Last ${windows} packets together`, fields,
          [el('th', { class: 'windows', title: 'packets it repeated in' }, 'in'), el('th', { class: 'count' }, 'count')],
          recentRows.length ? recentRows : none(fields.length + 2)));
      card.append(tables);
      if (selected && selected.slice === key) card.append(detail(fields, key, JSON.parse(selected.key), drawLater));
      return card;
    });
    const drawLater = [];
    root.replaceChildren(...cards);
    for (const draw of drawLater) draw();
  }

  // One combination over the recent windows: its count in each packet that
  // reports it (absent: it did not repeat, or was beyond the reported top).
  function detail(fields, key, values, drawLater) {
    const old = packets.slice().reverse();
    const counts = old.map((p) => {
      const m = (p.metrics || []).find((m) => sliceKey(m.slice) === key);
      if (!m) return null;
      const row = m.duplicates.find((r) => JSON.stringify(rowValues(fields, r)) === JSON.stringify(values));
      return row ? row.count : 0;
    });
    const seen = counts.filter((c) => c > 0).length;
    const total = counts.reduce((a, c) => a + (c || 0), 0);
    const plot = el('div', { class: 'plot' });
    // The figure caption doubles as the chart's accessible name.
    const fig = el('figure', { class: 'chart' }, el('figcaption', {}, 'Count per packet'), plot);
    // Drawn once in the page, to know its width.
    drawLater.push(() => chart(plot, old.map(packetLabel), [{ name: 'count', color: COLORS[3], values: counts }], 'bars'));
    return el('div', { class: 'detail' },
      el('h3', {}, el('span', {}, fields.map((f, i) => f + ' = ' + (values[i] === null ? '(null)' : values[i])).join(' · ')),
        closeButton()),
      fig,
      el('p', {}, `Repeated in ${seen} of ${old.length} packets, ${num(total)} events in all. ` +
        'A packet without it: fewer than two events, or beyond the top rows it reports.'));
  }

  function closeButton() {
    const b = el('button', { type: 'button' }, 'close');
    b.addEventListener('click', (e) => { e.stopPropagation(); selected = null; renderSlices(); });
    return b;
  }

  // ---- polling --------------------------------------------------------------

  function notice(text) {
    const n = $('notice');
    n.hidden = !text;
    n.textContent = text || '';
  }

  function failed(e) {
    const badge = $('state');
    badge.className = 'badge state-error';
    if (e instanceof Unauthorized) {
      badge.textContent = 'unauthorized';
      notice('This dashboard needs its token (telemetry.token): open it as /?token=…');
    } else {
      badge.textContent = 'unreachable';
      notice('Cannot reach login-metrics (retrying): ' + e.message);
    }
  }

  // The status, every two seconds.
  async function statusLoop() {
    try {
      const s = (await getJson('/api/status')).body;
      if (s.packets_seq < seq) { packets = []; seq = 0; } // the service restarted
      const first = status === null;
      status = s;
      renderStatus();
      if (first) { renderCharts(); renderSlices(); }
      notice(null);
    } catch (e) {
      failed(e);
    }
    setTimeout(statusLoop, STATUS_MS);
  }

  // The packets, long-polled: the server answers as soon as a packet newer
  // than the one held is published (or after WAIT_S with nothing new).
  async function packetLoop() {
    let pause = PACKETS_PAUSE_MS;
    try {
      const { body, response } = await getJson(`/api/packets?limit=${RECENT}&after=${seq}&wait=${WAIT_S}`);
      const newest = Number(response.headers.get('x-packet-seq'));
      if (newest < seq) {
        // The service restarted and counts from 1 again: start over.
        packets = []; seq = 0; pause = 0;
      } else if (body.length) {
        packets = body.concat(packets).slice(0, RECENT);
        seq = newest;
        updates += 1;
        renderCharts();
        renderSlices();
        document.body.dataset.packetId = packets[0].packet_id;
        document.body.dataset.updates = String(updates);
      }
      document.body.dataset.ready = '1';
    } catch (e) {
      failed(e);
      pause = STATUS_MS;
    }
    setTimeout(packetLoop, pause);
  }
  let resizeTimer = null;
  window.addEventListener('resize', () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { if (status) { renderCharts(); renderSlices(); } }, 150);
  });

  statusLoop();
  packetLoop();
})();
