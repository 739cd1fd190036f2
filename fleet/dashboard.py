"""`edge-fleet dashboard`: one local web page that shows the fleet live.

Served by the standard library: `/` is a self-contained page (no build step, no CDN),
`/api/fleet` the current snapshot as JSON, `/events` the same snapshot every
`EVERY_S` seconds as Server-Sent Events, so the page updates without reload. The snapshot
comes from the fleet database (`fleet.devices.watcher`, kept current by a monitoring
`FleetWatcher` of its own) and the rollout tables.

Made for a fleet, not a list: a summary (devices, online, health counts), the version
distribution of every model, each rollout with its per-wave breakdown of execution
statuses, its controller's liveness (a running rollout whose controller is silent shows
as stalled), its halt reason and the devices that caused it; then a device table that
sorts by any column, filters by text and health, and pages (only the page shown is
rendered), with each device's last anomaly and when it came, when it was last seen, and
a latency sparkline with its scale.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections import Counter, defaultdict, deque
from typing import Any
from urllib.parse import urlsplit

from fleet.devices.registry import FleetDB
from fleet.devices.status import shown_models
from fleet.rollout.policy import DONE
from fleet.rollout.record import Rollouts

EVERY_S = 2.0

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>edge-fleet</title>
<style>
 body{font:14px system-ui,sans-serif;margin:24px;color:#222}
 table{border-collapse:collapse;margin-bottom:12px} td,th{padding:3px 8px;text-align:left}
 th{cursor:pointer;user-select:none;background:#eee} th.sorted::after{content:attr(data-dir)}
 tr:nth-child(even){background:#f6f6f6} .off{color:#999} .anom{color:#b00}
 .bar{width:240px;height:12px;background:#eee;display:inline-block;vertical-align:middle}
 .fill{height:12px;background:#2a7} .halted .fill,.aborted .fill{background:#c33}
 .stalled{color:#b60} .chips span{display:inline-block;margin:2px 6px 2px 0;padding:1px 6px;
 border-radius:8px;background:#eef} .rollout{margin:8px 0 16px} .waves td{padding:1px 8px}
 svg{vertical-align:middle} .scale{font-size:11px;color:#666}
</style></head><body>
<h1>edge-fleet <span id="fleet"></span></h1>
<p id="summary">loading…</p>
<h2>Versions</h2><div id="versions" class="chips"></div>
<h2>Rollouts</h2><div id="rollouts"></div>
<h2>Devices</h2>
<p><input id="filter" placeholder="filter: device, profile, model, anomaly" size="40">
 <select id="health"><option value="">any health</option></select>
 <span id="count"></span>
 <button id="prev">&lt;</button> <span id="page"></span> <button id="next">&gt;</button></p>
<table><thead><tr id="heads"></tr></thead><tbody id="devices"></tbody></table>
<script>
const COLS=[['device','device'],['online','online'],['profile','profile'],
 ['models','models'],['health','health'],['seen_s','last seen'],['latency','p50 latency'],
 ['anomaly_s','last anomaly']];
const PER_PAGE=50;
let S=null, sortKey='device', sortDir=1, page=0;
function esc(s){return String(s??'').replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;',
  '>':'&gt;','"':'&quot;'}[c]));}
function ago(s){if(s==null)return '-'; if(s<90)return Math.round(s)+' s ago';
  if(s<5400)return Math.round(s/60)+' min ago'; return Math.round(s/3600)+' h ago';}
function spark(points){
  if(!points.length) return '-';
  const w=110,h=22,lo=Math.min(...points),hi=Math.max(...points),span=Math.max(hi-lo,1e-9);
  const xy=points.map((v,i)=>`${(i/Math.max(points.length-1,1))*w},${h-1-((v-lo)/span)*(h-2)}`);
  return `<svg width="${w}" height="${h}"><polyline fill="none" stroke="#27a"
    points="${xy.join(' ')}"/></svg> ${points[points.length-1].toFixed(2)} ms
    <span class="scale">(${lo.toFixed(2)}–${hi.toFixed(2)})</span>`;
}
function value(d,k){
  if(k==='latency') return d.latency_ms.length?d.latency_ms[d.latency_ms.length-1]:-1;
  if(k==='seen_s'||k==='anomaly_s') return d[k]==null?1e12:d[k];
  if(k==='online') return d.online?0:1;
  return String(d[k]??'');
}
function rows(){
  const q=document.getElementById('filter').value.toLowerCase();
  const h=document.getElementById('health').value;
  let out=S.devices.filter(d=>(!h||d.health===h)&&(!q||(d.device+' '+d.profile+' '+d.models
    +' '+(d.last_anomaly||'')).toLowerCase().includes(q)));
  out.sort((a,b)=>{const x=value(a,sortKey),y=value(b,sortKey);
    return (x<y?-1:x>y?1:0)*sortDir||(a.device<b.device?-1:1);});
  return out;
}
function renderTable(){
  const all=rows(), pages=Math.max(1,Math.ceil(all.length/PER_PAGE));
  page=Math.min(page,pages-1);
  document.getElementById('count').textContent=`${all.length} of ${S.devices.length}`;
  document.getElementById('page').textContent=`page ${page+1} of ${pages}`;
  document.getElementById('heads').innerHTML=COLS.map(([k,t])=>
    `<th data-key="${k}" class="${k===sortKey?'sorted':''}"
      data-dir="${sortDir>0?' ▲':' ▼'}">${t}</th>`).join('');
  document.getElementById('devices').innerHTML=all.slice(page*PER_PAGE,(page+1)*PER_PAGE)
   .map(d=>`<tr data-device="${esc(d.device)}" class="${d.online?'':'off'}">
     <td>${esc(d.device)}</td><td>${d.online?'yes':'no'}</td><td>${esc(d.profile)}</td>
     <td class="models">${esc(d.models)}</td><td>${esc(d.health)}</td>
     <td>${ago(d.seen_s)}</td><td>${spark(d.latency_ms)}</td>
     <td class="anom">${d.last_anomaly?esc(d.last_anomaly)+' <span class="scale">'+
       esc(d.last_anomaly_at)+' ('+ago(d.anomaly_s)+')</span>':'-'}</td></tr>`).join('');
}
function renderRollout(r){
  const waves=r.waves_detail.map(w=>`<tr><td>wave ${w.wave}</td><td>${w.size} device(s)</td>
    <td>${Object.entries(w.counts).map(([k,n])=>n+' '+esc(k)).join(', ')}</td></tr>`).join('');
  const who=r.controller?`controller ${esc(r.controller)}, seen ${ago(r.controller_age_s)}`
    :'no controller';
  return `<div class="rollout ${esc(r.status)}" data-id="${esc(r.id)}"
      data-progress="${r.committed}/${r.total}">
     ${esc(r.model)} v${r.version} → ${esc(r.group)}: <b class="${esc(r.status)}">${
       esc(r.status)}</b>, wave ${r.wave} of ${r.waves} <span class="bar"><span class="fill"
     style="display:block;width:${r.total?100*r.committed/r.total:0}%"></span></span>
     ${r.committed}/${r.total} committed or current; ${who}
     ${r.reason?'<div>'+esc(r.reason)+'</div>':''}
     ${r.culprits.length?'<div class="culprits">caused by: '+r.culprits.map(esc).join(', ')
       +'</div>':''}
     <table class="waves">${waves}</table></div>`;
}
function render(s){
  S=s;
  const t0=performance.now();
  document.getElementById('fleet').textContent=s.fleet;
  const hc=Object.entries(s.summary.health).map(([k,n])=>`${n} ${k}`).join(', ');
  document.getElementById('summary').textContent=
    `${s.summary.devices} device(s), ${s.summary.online} online (${hc}) — `+
    new Date(s.at*1000).toLocaleTimeString();
  document.getElementById('versions').innerHTML=Object.entries(s.versions).map(([m,vs])=>
    Object.entries(vs).map(([v,n])=>`<span data-version="${esc(m+' '+v)}">${esc(m)} ${
      esc(v)}: ${n}</span>`).join('')).join('')||'-';
  document.getElementById('rollouts').innerHTML=s.rollouts.map(renderRollout).join('')
    ||'<p>none</p>';
  const sel=document.getElementById('health'), want=sel.value;
  sel.innerHTML='<option value="">any health</option>'+Object.keys(s.summary.health)
    .map(h=>`<option${h===want?' selected':''}>${esc(h)}</option>`).join('');
  renderTable();
  document.body.dataset.renderMs=(performance.now()-t0).toFixed(1);
}
document.getElementById('heads').onclick=e=>{const k=e.target.dataset.key; if(!k)return;
  sortDir=(k===sortKey)?-sortDir:1; sortKey=k; renderTable();};
document.getElementById('filter').oninput=()=>{page=0;renderTable();};
document.getElementById('health').onchange=()=>{page=0;renderTable();};
document.getElementById('prev').onclick=()=>{page=Math.max(0,page-1);renderTable();};
document.getElementById('next').onclick=()=>{page++;renderTable();};
const P=new URLSearchParams(location.search);
if(P.get('q'))document.getElementById('filter').value=P.get('q');
if(P.get('sort')){sortKey=P.get('sort');sortDir=P.get('dir')==='desc'?-1:1;}
if(P.get('page'))page=Number(P.get('page'))-1;
render(INITIAL);
if(P.get('health')){document.getElementById('health').value=P.get('health');renderTable();}
new EventSource('/events').onmessage=e=>render(JSON.parse(e.data));
</script></body></html>
"""


class Dashboard:
    def __init__(self, db: FleetDB, fleet: str, *, history: int = 30) -> None:
        self.db, self.fleet = db, fleet
        self.rollouts = Rollouts(db)
        self._latency: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=history))
        self._seen: dict[str, str] = {}
        self._lock = threading.Lock()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            with self.db.store.lock:
                rows = self.db.store.execute(
                    "SELECT device, telemetry_json FROM devices").fetchall()
            for device, tel in rows:
                if tel and self._seen.get(device) != tel:
                    self._seen[device] = tel
                    p50 = [m.get("latency_p50_ms") for m in json.loads(tel)["models"].values()]
                    if p50 and p50[0] is not None:
                        self._latency[device].append(round(float(p50[0]), 3))
            devices, health = [], Counter[str]()
            versions: dict[str, Counter[str]] = defaultdict(Counter)
            for r in self.db.devices():
                health[r.health] += 1
                for name, m in r.models.items():
                    versions[name][shown_models({name: m}).removeprefix(f"{name} ")] += 1
                devices.append({"device": r.device, "online": r.online, "profile": r.profile,
                                "models": shown_models(r.models), "health": r.health,
                                "last_anomaly": r.last_anomaly,
                                "last_anomaly_at": r.last_anomaly_at,
                                "anomaly_s": _round(r.anomaly_age_s),
                                "seen_s": _round(r.last_seen_age_s),
                                "latency_ms": list(self._latency[r.device])})
            return {"fleet": self.fleet, "at": time.time(),
                    "summary": {"devices": len(devices),
                                "online": sum(d["online"] for d in devices),
                                "health": dict(sorted(health.items()))},
                    "versions": {m: dict(sorted(c.items())) for m, c in
                                 sorted(versions.items())},
                    "devices": devices, "rollouts": self._rollouts()}

    def _rollouts(self) -> list[dict[str, Any]]:
        out = []
        now = time.time()
        online = self.db.online()
        for rid in reversed(self.rollouts.ids()):  # the newest first
            ro, devs = self.rollouts.get(rid), self.rollouts.devices(rid)
            waves = []
            for w, size in enumerate(ro.sizes):
                mine = [d for d in devs if d.wave == w]
                counts = Counter(d.shown(online) for d in mine)
                waves.append({"wave": w + 1, "size": len(mine),
                              "counts": dict(sorted(counts.items())), "cumulative": size})
            out.append({"id": rid, "model": ro.model, "version": ro.version,
                        "group": ro.group, "status": ro.shown_status(now),
                        "wave": ro.wave + 1, "waves": len(ro.sizes), "total": len(devs),
                        "reason": ro.reason, "culprits": ro.culprits[:50],
                        "controller": ro.owner,
                        "controller_age_s": _round(None if ro.owner_beat is None
                                                   else now - ro.owner_beat),
                        "committed": sum(d.status in DONE for d in devs),
                        "waves_detail": waves})
        return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def make_server(dash: Dashboard, host: str = "127.0.0.1", port: int = 0
                ) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, body: bytes, ctype: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = urlsplit(self.path).path  # the page reads its own query (sort, filter)
            if path == "/":
                # The first snapshot is in the page, rendered by the same code as the live
                # updates, so the page is complete at load; /events keeps it current.
                initial = json.dumps(dash.snapshot()).replace("</", "<\\/")
                page = PAGE.replace("render(INITIAL);", f"render({initial});")
                self._send(page.encode(), "text/html; charset=utf-8")
            elif path == "/api/fleet":
                self._send(json.dumps(dash.snapshot()).encode(), "application/json")
            elif path == "/events":
                self._stream()
            else:
                self.send_error(404)

        def _stream(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            try:
                while True:
                    self.wfile.write(f"data: {json.dumps(dash.snapshot())}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(EVERY_S)
            except (BrokenPipeError, ConnectionResetError):
                return

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server
