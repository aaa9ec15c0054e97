// The live avatar page: mic -> WebRTC -> server; avatar video and the returned voice <- server.
// Signaling and live tuning go over one websocket (/ws); see server/signaling.py for the messages.
"use strict";

const KIOSK = new URLSearchParams(location.search).get("kiosk") === "1";
// a server started with --token is opened as /?token=...; the page passes it on (websockets cannot carry headers)
const TOKEN = new URLSearchParams(location.search).get("token");
const RECONNECT_DELAY_MS = 3000;
const MAX_REFERENCE_SIDE = 512;  // the page scales pictures down so the offer stays small

const $ = (id) => document.getElementById(id);
const ui = {
  video: $("avatar"), start: $("start"), stop: $("stop"), status: $("status"), error: $("error"),
  steps: $("steps"), stepsValue: $("steps-value"), reference: $("reference"), preview: $("reference-preview"),
  unmute: $("unmute"),
  fps: $("r-fps"), decoded: $("r-decoded"), latency: $("r-latency"), gen: $("r-gen"), queue: $("r-queue"),
  clipSteps: $("r-steps"), sessionId: $("r-session"),
};

const state = {
  pc: null, ws: null, mic: null, statsTimer: null, referenceDataUrl: null,
  running: false, wantRunning: false, lastDecoded: null, framesDecoded: 0, serverStats: null,
  sessionId: null, hasMic: false,
};
window.avatarPage = state;  // read by the browser test and handy in the console

function setStatus(text) { ui.status.textContent = text; }
function showError(text) { ui.error.textContent = text || ""; }

function withToken(path) {
  return TOKEN ? `${path}?token=${encodeURIComponent(TOKEN)}` : path;
}

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${withToken("/ws")}`;
}

async function iceServers() {
  // STUN/TURN servers from the server's config (server.ice_servers); none on a LAN
  const response = await fetch(withToken("/config.json"), { cache: "no-store" });
  if (response.status === 401) throw new Error("this server needs a token: open the page as /?token=YOUR_TOKEN");
  if (!response.ok) throw new Error(`cannot read the server's /config.json (HTTP ${response.status})`);
  return (await response.json()).iceServers || [];
}

function waitForIceGathering(pc, timeoutMs = 3000) {
  // the server answers once, without trickle ICE, so the offer carries every candidate
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { pc.removeEventListener("icegatheringstatechange", check); resolve(); };
    const check = () => { if (pc.iceGatheringState === "complete") done(); };
    pc.addEventListener("icegatheringstatechange", check);
    setTimeout(done, timeoutMs);
  });
}

function openSocket() {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(wsUrl());
    ws.onopen = () => resolve(ws);
    ws.onerror = () => reject(new Error("cannot reach the server's websocket"));
  });
}

async function start() {
  if (state.running) return;
  state.wantRunning = true;
  showError("");
  ui.start.disabled = true;
  setStatus("asking for the microphone…");
  try {
    state.mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
  } catch (err) {
    if (!KIOSK) {
      ui.start.disabled = false;
      state.wantRunning = false;
      showError(`Microphone not available: ${err.message}. Allow it in the address bar and press Start again.`);
      setStatus("idle");
      return;
    }
    // a kiosk without a microphone still shows the avatar; a bot makes it speak (POST /sessions/ID/speak)
    state.mic = null;
  }
  setStatus("connecting…");
  let servers;
  try {
    servers = await iceServers();
  } catch (err) {
    showError(err.message);
    connectionLost(err.message);
    return;
  }
  const pc = new RTCPeerConnection({ iceServers: servers });
  state.pc = pc;
  state.hasMic = Boolean(state.mic);
  if (state.mic) {
    for (const track of state.mic.getAudioTracks()) pc.addTrack(track, state.mic);
  } else {
    pc.addTransceiver("audio", { direction: "recvonly" });  // hear what the bot makes the avatar say
  }
  pc.addTransceiver("video", { direction: "recvonly" });
  const remote = new MediaStream();
  pc.ontrack = (event) => {
    remote.addTrack(event.track);
    ui.video.srcObject = remote;
    playVideo();
  };
  pc.onconnectionstatechange = () => {
    setStatus(pc.connectionState);
    if (pc.connectionState === "failed" || pc.connectionState === "disconnected") connectionLost("media connection " + pc.connectionState);
  };
  await pc.setLocalDescription(await pc.createOffer());
  await waitForIceGathering(pc);
  try {
    state.ws = await openSocket();
  } catch (err) {
    connectionLost(err.message);
    return;
  }
  state.ws.onmessage = (event) => onServerMessage(JSON.parse(event.data));
  state.ws.onclose = () => { if (state.wantRunning) connectionLost("the server closed the connection"); };
  const config = { sample_steps: Number(ui.steps.value) };
  if (state.referenceDataUrl) config.reference_image = state.referenceDataUrl;
  state.ws.send(JSON.stringify({ type: "offer", sdp: pc.localDescription.sdp, config }));
  state.running = true;
  ui.stop.disabled = false;
  state.statsTimer = setInterval(readStats, 1000);
}

async function playVideo() {
  ui.video.muted = false;
  try {
    await ui.video.play();
    ui.unmute.hidden = true;
  } catch (err) {
    // autoplay with sound needs a gesture (kiosk browsers may allow it); show the picture meanwhile
    ui.video.muted = true;
    ui.unmute.hidden = false;
    ui.video.play().catch(() => {});
  }
}

function onServerMessage(message) {
  if (message.type === "answer") {
    state.pc.setRemoteDescription({ type: "answer", sdp: message.sdp });
    state.sessionId = message.session_id;
    ui.sessionId.textContent = message.session_id;
    setStatus(state.hasMic ? "connected, waiting for the first clip…" : "connected without a microphone: idle until spoken to");
  } else if (message.type === "queued") {
    setStatus(`waiting: ${message.message}`);
  } else if (message.type === "stats") {
    state.serverStats = message;
    showServerStats(message);
  } else if (message.type === "error") {
    showError(`${message.message}`);
    if (["busy", "connection_lost", "bad_offer"].includes(message.code)) connectionLost(message.message);
  }
}

function showServerStats(s) {
  ui.latency.textContent = s.latency_ms == null ? "waiting for the first clip" : `${Math.round(s.latency_ms)} ms`;
  ui.gen.textContent = s.generation_ms == null ? "–" : `${Math.round(s.generation_ms)} ms / ${Math.round(s.clip_ms)} ms`;
  ui.queue.textContent = `${s.queue_depth} · ${s.clips_done} / ${s.clips_dropped}`;
  ui.clipSteps.textContent = `${s.sample_steps} (${s.clip_sample_steps ?? "–"})`;
}

async function readStats() {
  if (!state.pc) return;
  const report = await state.pc.getStats();
  report.forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "video") {
      state.framesDecoded = r.framesDecoded || 0;
      ui.decoded.textContent = state.framesDecoded;
      const fps = r.framesPerSecond ?? (state.lastDecoded == null ? null : state.framesDecoded - state.lastDecoded);
      ui.fps.textContent = fps == null ? "–" : Number(fps).toFixed(1);
      state.lastDecoded = state.framesDecoded;
    }
  });
}

function teardown() {
  clearInterval(state.statsTimer);
  state.statsTimer = null;
  if (state.ws) {
    state.ws.onclose = null;
    if (state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify({ type: "stop" }));
    state.ws.close();
  }
  if (state.pc) state.pc.close();
  if (state.mic) state.mic.getTracks().forEach((t) => t.stop());
  state.ws = state.pc = state.mic = null;
  state.running = false;
  state.lastDecoded = null;
  ui.start.disabled = false;
  ui.stop.disabled = true;
}

function stop() {
  state.wantRunning = false;
  teardown();
  setStatus("stopped");
}

function connectionLost(reason) {
  if (!state.running && !state.wantRunning) return;
  const again = KIOSK && state.wantRunning;
  teardown();
  setStatus(again ? `reconnecting (${reason})…` : `stopped: ${reason}`);
  if (again) setTimeout(() => { if (!state.running && state.wantRunning) start(); }, RECONNECT_DELAY_MS);
}

function loadReference(file) {
  if (!file) return;
  const image = new Image();
  image.onload = () => {
    const scale = Math.min(1, MAX_REFERENCE_SIDE / Math.max(image.width, image.height));
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(image.width * scale);
    canvas.height = Math.round(image.height * scale);
    canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
    state.referenceDataUrl = canvas.toDataURL("image/jpeg", 0.9);
    ui.preview.src = state.referenceDataUrl;
    ui.preview.hidden = false;
    URL.revokeObjectURL(image.src);
    if (state.running) showError("The new reference image is used from the next Start.");
  };
  image.onerror = () => showError("That file is not an image this browser can read.");
  image.src = URL.createObjectURL(file);
}

ui.start.onclick = start;
ui.stop.onclick = stop;
ui.unmute.onclick = () => { ui.video.muted = false; ui.video.play(); ui.unmute.hidden = true; };
ui.steps.oninput = () => { ui.stepsValue.textContent = ui.steps.value; };
ui.steps.onchange = () => {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify({ type: "set", sample_steps: Number(ui.steps.value) }));
  }
};
ui.reference.onchange = () => loadReference(ui.reference.files[0]);

if (KIOSK) {
  document.body.classList.add("kiosk");
  ui.video.onclick = () => document.documentElement.requestFullscreen?.().catch(() => {});
  start();
}
