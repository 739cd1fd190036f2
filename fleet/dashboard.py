"""`edge-fleet dashboard`: one local web page that shows the fleet live.

Served by the standard library: `/` is a self-contained page (no build step, no CDN),
`/api/fleet` the current snapshot as JSON, `/events` the same snapshot every second as
Server-Sent Events, so the page updates without reload. The snapshot comes from the fleet
database (`fleet.state`, kept current by a `FleetWatcher`) and the rollout tables: devices
(online, profile, versions, health, last anomaly, a latency sparkline from recent
telemetry) and rollouts (status, wave, devices committed of total).
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections import defaultdict, deque
from typing import Any

from fleet.policy import DONE
from fleet.rollout import Rollouts
from fleet.state import FleetDB

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>edge-fleet</title>
<style>
 body{font:14px system-ui,sans-serif;margin:24px;color:#222}
 table{border-collapse:collapse;margin-bottom:24px} td,th{padding:4px 10px;text-align:left}
 tr:nth-child(even){background:#f4f4f4} .off{color:#999} .anom{color:#b00}
 .bar{width:240px;height:12px;background:#eee;display:inline-block;vertical-align:middle}
 .fill{height:12px;background:#2a7} .halted .fill{background:#c33}
 svg{vertical-align:middle}
</style></head><body>
<h1>edge-fleet <span id="fleet"></span></h1>
<p id="summary">loading…</p>
<h2>Rollouts</h2><div id="rollouts"></div>
<h2>Devices</h2>
<table><thead><tr><th>device</th><th>online</th><th>profile</th><th>models</th>
<th>health</th><th>p50 latency</th><th>last anomaly</th></tr></thead>
<tbody id="devices"></tbody></table>
<script>
function spark(points){
  if(!points.length) return '';
  const w=120,h=24,max=Math.max(...points,1e-9);
  const xy=points.map((v,i)=>`${(i/(Math.max(points.length-1,1)))*w},${h-(v/max)*h}`);
  return `<svg width="${w}" height="${h}"><polyline fill="none" stroke="#27a"
    points="${xy.join(' ')}"/></svg> ${points[points.length-1].toFixed(2)} ms`;
}
function esc(s){return String(s??'').replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;',
  '>':'&gt;','"':'&quot;'}[c]));}
function render(s){
  document.getElementById('fleet').textContent=s.fleet;
  document.getElementById('summary').textContent=
    `${s.devices.length} device(s), ${s.devices.filter(d=>d.online).length} online — `+
    new Date(s.at*1000).toLocaleTimeString();
  document.getElementById('devices').innerHTML=s.devices.map(d=>
    `<tr data-device="${esc(d.device)}" class="${d.online?'':'off'}">
     <td>${esc(d.device)}</td><td>${d.online?'yes':'no'}</td><td>${esc(d.profile)}</td>
     <td class="models">${esc(Object.entries(d.models).map(([n,m])=>n+' v'+m.version+
       (m.committed===m.version?'':'*')).join(', '))}</td>
     <td>${esc(d.health)}</td><td>${spark(d.latency_ms)}</td>
     <td class="anom">${esc(d.last_anomaly)}</td></tr>`).join('');
  document.getElementById('rollouts').innerHTML=s.rollouts.map(r=>
    `<div class="rollout ${esc(r.status)}" data-id="${esc(r.id)}"
      data-progress="${r.committed}/${r.total}">
     ${esc(r.model)} v${r.version} → ${esc(r.group)}: <b>${esc(r.status)}</b>,
     wave ${r.wave} of ${r.waves} <span class="bar"><span class="fill"
     style="display:block;width:${r.total?100*r.committed/r.total:0}%"></span></span>
     ${r.committed}/${r.total} committed
     ${r.status==='halted'||r.status==='aborted'?esc(r.reason):''}</div>`).join('')||'<p>none</p>';
}
render(INITIAL);
new EventSource('/events').onmessage=e=>render(JSON.parse(e.data));
</script></body></html>
"""


class Dashboard:
    def __init__(self, db: FleetDB, fleet: str, *, history: int = 60) -> None:
        self.db, self.fleet = db, fleet
        self.rollouts = Rollouts(db)
        self._latency: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=history))
        self._seen: dict[str, str] = {}
        self._lock = threading.Lock()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            devices = []
            rows = self.db.connection.execute(
                "SELECT device, telemetry_json FROM devices").fetchall()
            for device, tel in rows:
                if tel and self._seen.get(device) != tel:
                    self._seen[device] = tel
                    p50 = [m.get("latency_p50_ms") for m in json.loads(tel)["models"].values()]
                    if p50 and p50[0] is not None:
                        self._latency[device].append(float(p50[0]))
            for r in self.db.devices():
                devices.append({"device": r.device, "online": r.online, "profile": r.profile,
                                "models": r.models, "health": r.health,
                                "last_anomaly": r.last_anomaly,
                                "latency_ms": list(self._latency[r.device])})
            return {"fleet": self.fleet, "at": time.time(), "devices": devices,
                    "rollouts": self._rollouts()}

    def _rollouts(self) -> list[dict[str, Any]]:
        out = []
        for rid in self.rollouts.ids():
            ro, devs = self.rollouts.get(rid), self.rollouts.devices(rid)
            out.append({"id": rid, "model": ro.model, "version": ro.version,
                        "group": ro.group, "status": ro.status.value,
                        "wave": ro.wave + 1, "waves": len(ro.sizes),
                        "total": len(devs), "reason": ro.reason,
                        "committed": sum(d.status in DONE for d in devs)})
        return out


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
            if self.path == "/":
                # The first snapshot is in the page, rendered by the same code as the live
                # updates, so the page is complete at load; /events keeps it current.
                initial = json.dumps(dash.snapshot()).replace("</", "<\\/")
                page = PAGE.replace("render(INITIAL);", f"render({initial});")
                self._send(page.encode(), "text/html; charset=utf-8")
            elif self.path == "/api/fleet":
                self._send(json.dumps(dash.snapshot()).encode(), "application/json")
            elif self.path == "/events":
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
                    time.sleep(1.0)
            except (BrokenPipeError, ConnectionResetError):
                return

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server
