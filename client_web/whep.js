// A WHEP viewer of one session, for OBS (Browser Source) and any screen: /static/whep.html?session=ID[&token=T].
// It receives the session's video and voice over WebRTC (POST /sessions/ID/whep) and reconnects when they drop.
"use strict";

const params = new URLSearchParams(location.search);
const SESSION = params.get("session");
const TOKEN = params.get("token");
const RETRY_MS = 3000;
const video = document.getElementById("avatar");
const status = (text) => { document.getElementById("status").textContent = text; };
let resource = null;

async function watch() {
  if (!SESSION) { status("add ?session=ID (from GET /sessions or the page) to the URL"); return; }
  const pc = new RTCPeerConnection();
  pc.addTransceiver("audio", { direction: "recvonly" });
  pc.addTransceiver("video", { direction: "recvonly" });
  const stream = new MediaStream();
  pc.ontrack = (event) => { stream.addTrack(event.track); video.srcObject = stream; video.play().catch(() => {}); };
  pc.onconnectionstatechange = () => {
    status(pc.connectionState);
    if (["failed", "closed", "disconnected"].includes(pc.connectionState)) retry(pc);
  };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {  // one offer with every candidate: the server does not trickle
    if (pc.iceGatheringState === "complete") return resolve();
    pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === "complete") resolve(); };
    setTimeout(resolve, 2000);
  });
  const headers = { "Content-Type": "application/sdp" };
  if (TOKEN) headers.Authorization = `Bearer ${TOKEN}`;
  const response = await fetch(`/sessions/${encodeURIComponent(SESSION)}/whep`,
    { method: "POST", headers, body: pc.localDescription.sdp });
  if (response.status !== 201) {
    const error = await response.json().catch(() => ({ message: `HTTP ${response.status}` }));
    status(`not watching: ${error.message}`);
    pc.close();
    if (response.status >= 500 || response.status === 429) setTimeout(watch, RETRY_MS);
    return;
  }
  resource = response.headers.get("Location");
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
}

function retry(pc) {
  pc.onconnectionstatechange = null;
  pc.close();
  status("reconnecting…");
  setTimeout(watch, RETRY_MS);
}

window.addEventListener("pagehide", () => {
  if (resource) fetch(resource, { method: "DELETE", keepalive: true, headers: TOKEN ? { Authorization: `Bearer ${TOKEN}` } : {} });
});
watch();
