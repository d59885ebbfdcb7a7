// Earshot browser demo: microphone or file -> /v1/listen -> live transcript.
//
// Audio is always sent as mono 16-bit little-endian PCM at 16 kHz
// (encoding=linear16&sample_rate=16000): the microphone is resampled in an
// AudioWorklet (worklet.js), a file is decoded and resampled by the browser
// (decodeAudioData on a 16 kHz OfflineAudioContext) and sent in real time.
// The API key travels as the websocket subprotocols ["token", KEY]. When the
// server refuses a stream before the upgrade (401, 403, 503, 400), a browser
// only sees the websocket fail, so the page asks the same URL again over
// plain HTTP to learn the server's reason (see explainRefusal).
// No build step, no dependencies, nothing loaded from elsewhere.
"use strict";

(() => {
  const TARGET_RATE = 16000;
  const CHUNK_MS = 50; // microphone chunks
  const FILE_CHUNK_S = 0.1; // file chunks, sent at the pace of real time
  const OPEN_TIMEOUT_MS = 10000;
  const CLOSE_TIMEOUT_MS = 45000; // after CloseStream (the server waits up to 30 s for finals)
  const MAX_PENDING_S = 10; // audio held while the websocket opens

  const $ = (id) => document.getElementById(id);
  const ui = {
    body: document.body,
    state: $("state"),
    stateText: $("state-text"),
    language: $("language"),
    apiKey: $("api-key"),
    start: $("start"),
    stop: $("stop"),
    file: $("file"),
    notice: $("notice"),
    noticeTitle: $("notice-title"),
    noticeText: $("notice-text"),
    transcript: $("transcript"),
    placeholder: $("placeholder"),
    latency: $("latency"),
    audioSent: $("audio-sent"),
    downloadTxt: $("download-txt"),
    downloadSrt: $("download-srt"),
    clear: $("clear"),
    info: $("info"),
    infoEmpty: $("info-empty"),
    infoStream: $("info-stream"),
    infoModel: $("info-model"),
    infoPolicy: $("info-policy"),
    infoDecoding: $("info-decoding"),
  };

  // What happened, in order: for people debugging the page (and its tests).
  const log = [];
  window.earshotDemo = { log };
  const record = (kind, detail) => {
    log.push({ kind, t: performance.now(), ...detail });
    if (log.length > 20000) log.splice(0, 5000);
  };

  // --- state and notices ---------------------------------------------------

  let state = "idle"; // idle | connecting | streaming | closing | error
  let session = null;

  function setState(next, text) {
    state = next;
    ui.body.dataset.state = next;
    ui.state.dataset.state = next;
    ui.stateText.textContent = text;
    const busy = next === "connecting" || next === "streaming" || next === "closing";
    ui.start.disabled = busy;
    ui.file.disabled = busy;
    ui.stop.disabled = !(next === "connecting" || next === "streaming");
    // Keep keyboard focus on a usable button (Start and Stop take turns).
    const focused = document.activeElement;
    if (focused && focused.disabled) {
      const other = focused === ui.stop ? ui.start : ui.stop;
      if (!other.disabled) other.focus();
    }
    record("state", { state: next, text });
  }

  function showNotice(level, title, text) {
    ui.notice.hidden = false;
    ui.notice.dataset.level = level;
    ui.noticeTitle.textContent = title;
    ui.noticeText.textContent = text || "";
    if (level === "error") ui.notice.scrollIntoView({ block: "nearest" });
    record("notice", { level, title, text });
  }

  function clearNotice() {
    ui.notice.hidden = true;
    ui.noticeTitle.textContent = "";
    ui.noticeText.textContent = "";
  }

  // --- transcript ----------------------------------------------------------

  const finals = []; // {channel, start, end, text}, start/end on the page's clock
  const channels = new Map(); // channel index -> {section, lines, interim}
  let clockOffset = 0; // seconds of audio streamed by earlier sessions

  function channelView(index) {
    let view = channels.get(index);
    if (view) return view;
    ui.placeholder.hidden = true;
    const section = document.createElement("div");
    section.className = "channel";
    section.dataset.channel = String(index);
    const title = document.createElement("h3");
    title.className = "channel-title";
    title.textContent = `Channel ${index + 1}`;
    const lines = document.createElement("p");
    lines.className = "lines";
    const interim = document.createElement("span");
    interim.className = "interim";
    interim.setAttribute("aria-hidden", "true"); // announced once confirmed, not while it changes
    lines.append(interim);
    section.append(title, lines);
    const after = [...channels.keys()].filter((k) => k > index).sort((a, b) => a - b)[0];
    ui.transcript.insertBefore(section, after === undefined ? null : channels.get(after).section);
    view = { section, lines, interim };
    channels.set(index, view);
    ui.transcript.classList.toggle("multi", channels.size > 1);
    return view;
  }

  function keepScrolled(fn) {
    const box = ui.transcript;
    const atEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 48;
    fn();
    if (atEnd) box.scrollTop = box.scrollHeight;
  }

  function showInterim(channel, text) {
    keepScrolled(() => {
      channelView(channel).interim.textContent = text;
    });
  }

  function addFinal(channel, text, start, end) {
    const view = channelView(channel);
    keepScrolled(() => {
      view.interim.textContent = "";
      if (!text) return; // an empty final clears the utterance's interims
      const span = document.createElement("span");
      span.className = "final";
      span.textContent = text;
      span.title = `${formatClock(start, ".")} to ${formatClock(end, ".")}`;
      view.lines.insertBefore(span, view.interim);
      view.lines.insertBefore(document.createTextNode(" "), view.interim);
      finals.push({ channel, start, end, text });
    });
    const empty = finals.length === 0;
    ui.downloadTxt.disabled = empty;
    ui.downloadSrt.disabled = empty;
    ui.clear.disabled = empty;
  }

  function clearTranscript() {
    finals.length = 0;
    for (const view of channels.values()) view.section.remove();
    channels.clear();
    clockOffset = 0;
    ui.placeholder.hidden = false;
    ui.transcript.classList.remove("multi");
    ui.downloadTxt.disabled = true;
    ui.downloadSrt.disabled = true;
    ui.clear.disabled = true;
  }

  // --- downloads -----------------------------------------------------------

  function formatClock(seconds, sep) {
    const ms = Math.max(0, Math.round(seconds * 1000));
    const h = Math.floor(ms / 3600000);
    const m = Math.floor(ms / 60000) % 60;
    const s = Math.floor(ms / 1000) % 60;
    const pad = (n, w) => String(n).padStart(w, "0");
    return `${pad(h, 2)}:${pad(m, 2)}:${pad(s, 2)}${sep}${pad(ms % 1000, 3)}`;
  }

  function label(item) {
    return channels.size > 1 ? `[channel ${item.channel + 1}] ` : "";
  }

  function transcriptText() {
    return finals.map((f) => label(f) + f.text).join("\n") + "\n";
  }

  function transcriptSrt() {
    const cues = [...finals].sort((a, b) => a.start - b.start || a.channel - b.channel);
    return cues
      .map((f, i) => {
        const end = Math.max(f.end, f.start + 0.001);
        return `${i + 1}\n${formatClock(f.start, ",")} --> ${formatClock(end, ",")}\n${label(f)}${f.text}\n`;
      })
      .join("\n");
  }

  function download(text, type, extension) {
    const stamp = new Date().toISOString().replace(/[:T]/g, "-").slice(0, 19);
    const url = URL.createObjectURL(new Blob([text], { type }));
    const link = document.createElement("a");
    link.href = url;
    link.download = `earshot-${stamp}.${extension}`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // --- the info panel ------------------------------------------------------

  const HEX_DIGEST = /^[0-9a-f]{32,}$/i;

  function valueNode(value, collapse) {
    if (value !== null && typeof value === "object" && !Array.isArray(value)) {
      const dl = document.createElement("dl");
      dl.className = "kv nested";
      fillList(dl, value);
      if (!collapse) return dl;
      const details = document.createElement("details");
      const summary = document.createElement("summary");
      const n = Object.keys(value).length;
      summary.textContent = `${n} ${n === 1 ? "entry" : "entries"}`;
      details.append(summary, dl);
      return details;
    }
    const span = document.createElement("span");
    if (value === null || value === undefined) span.textContent = "none";
    else if (typeof value === "boolean") {
      span.textContent = value ? "yes" : "no";
      span.className = value ? "yes" : "no";
    } else if (Array.isArray(value)) {
      span.textContent = value.length
        ? value.map((v) => (typeof v === "object" && v !== null ? JSON.stringify(v) : String(v))).join(", ")
        : "none";
    } else if (typeof value === "string" && HEX_DIGEST.test(value)) {
      const code = document.createElement("code");
      code.textContent = `${value.slice(0, 12)}…${value.slice(-4)}`;
      code.title = value;
      code.className = "digest";
      span.append(code);
    } else span.textContent = String(value);
    return span;
  }

  // Fill a <dl> with an object's keys and values, `order` first; nested
  // objects become nested lists (folded away when `collapse` is set).
  function fillList(dl, object, order = [], collapse = false) {
    dl.replaceChildren();
    const keys = Object.keys(object || {});
    const sorted = [...order.filter((k) => keys.includes(k)), ...keys.filter((k) => !order.includes(k))];
    for (const key of sorted) {
      const row = document.createElement("div");
      const dt = document.createElement("dt");
      dt.textContent = key.replace(/_/g, " ");
      const dd = document.createElement("dd");
      dd.dataset.key = key;
      dd.append(valueNode(object[key], collapse));
      row.append(dt, dd);
      dl.append(row);
    }
  }

  const MODEL_ORDER = ["name", "source", "revision", "license", "model_sha256", "sha256", "backend", "device", "compute_type", "quantization", "record_verified"];

  function showMetadata(message, last) {
    const earshot = message.earshot || {};
    const settings = earshot.settings || {};
    const stream = {
      request_id: message.request_id,
      created: message.created ? new Date(message.created).toLocaleString() : undefined,
      protocol_version: earshot.protocol_version,
      language: settings.language,
      audio: settings.encoding ? `${settings.encoding}, ${settings.sample_rate} Hz, ${settings.channels} ch` : undefined,
    };
    if (earshot.ignored_parameters && earshot.ignored_parameters.length) stream.ignored_parameters = earshot.ignored_parameters;
    if (last) stream.duration = `${Number(message.duration || 0).toFixed(2)} s`;
    for (const key of Object.keys(stream)) if (stream[key] === undefined) delete stream[key];
    fillList(ui.infoStream, stream);
    ui.info.dataset.requestId = message.request_id || "";
    if (!last || earshot.model) fillList(ui.infoModel, earshot.model || {}, MODEL_ORDER, true);
    if (!last || earshot.policy) fillList(ui.infoPolicy, earshot.policy || {});
    if (!last || earshot.decoding) fillList(ui.infoDecoding, earshot.decoding || {}, ["final", "interim"]);
    ui.info.hidden = false;
    ui.infoEmpty.hidden = true;
  }

  // --- refusals and closes -------------------------------------------------

  const CLOSE_REASONS = {
    1000: "The stream ended normally.",
    1001: "The server is shutting down.",
    1006: "The connection dropped without a close frame (network, proxy or server stopped).",
    1009: "A message was too big for the server.",
    1011: "The server hit an internal error.",
    4400: "The server rejected the stream's settings or audio.",
    4401: "The server refused the API key.",
    4403: "The server refused this page's origin.",
    4408: "The stream was idle for too long (no audio and no KeepAlive).",
    4409: "The stream reached the server's longest session.",
    4413: "An audio frame was over the server's size limit.",
    4429: "The stream fell too far behind real time (the server is overloaded).",
    4430: "The page did not read the server's messages fast enough.",
    4503: "The server is overloaded.",
  };

  const NON_FATAL = new Set(["invalid_message", "audio_partial_frame"]);

  // Join texts as sentences (the server's messages, shown as they are, have
  // no final period).
  function sentences(...parts) {
    return parts
      .filter(Boolean)
      .map((p) => String(p).trim())
      .map((p) => (/[.!?]$/.test(p) ? p : `${p}.`))
      .join(" ");
  }

  function hintFor(code, status, retryAfter) {
    switch (code) {
      case "unauthorized":
        return ui.apiKey.value ? "Check the API key field." : "This server needs an API key: type it in the API key field.";
      case "forbidden_origin":
        return `To allow this page, add ${location.origin} to the server's allowed_origins (EARSHOT_ALLOWED_ORIGINS=${location.origin}).`;
      case "server_full":
      case "server_shutting_down":
        return retryAfter ? `Try again in ${retryAfter} s.` : "Try again later.";
      default:
        return status === 400 ? "Change the settings and try again." : "";
    }
  }

  // A browser does not tell a page why a websocket upgrade was refused. The
  // server refuses before the upgrade with a JSON body, so the page asks again
  // over plain HTTP: a GET of the same URL with the key as a Bearer header
  // meets the same key, capacity and parameter checks (a same-origin GET
  // carries no Origin header, so it passes the origin check; one that passes
  // every check is answered 426 websocket_required). If the GET finds
  // nothing, a POST, which browsers send with an Origin header, meets the
  // origin check; past it, the server answers 405 method_not_allowed.
  async function explainRefusal(wsUrl, key) {
    const url = wsUrl.replace(/^ws/, "http");
    for (const method of ["GET", "POST"]) {
      const controller = new AbortController();
      const timer = setTimeout(() => controller.abort(), 5000);
      try {
        const response = await fetch(url, {
          method,
          headers: key ? { Authorization: `Bearer ${key}` } : {},
          cache: "no-store",
          credentials: "omit",
          redirect: "error",
          signal: controller.signal,
        });
        const type = response.headers.get("Content-Type") || "";
        if (!response.ok && type.includes("json")) {
          const body = await response.json();
          const error = body.error && typeof body.error === "object" ? body.error : body;
          // These say only that the request passed every check.
          const passed = error.code === "websocket_required" || error.code === "method_not_allowed";
          if (!passed && (error.code || error.message)) {
            return {
              status: response.status,
              code: error.code || "",
              message: error.message || error.description || "",
              retryAfter: response.headers.get("Retry-After"),
            };
          }
        }
      } catch (err) {
        if (method === "GET") return { unreachable: true, detail: String(err && err.message ? err.message : err) };
      } finally {
        clearTimeout(timer);
      }
    }
    return null;
  }

  // --- one stream ----------------------------------------------------------

  class Session {
    constructor(kind, key, language) {
      this.kind = kind; // "mic" or "file"
      this.key = key;
      this.language = language;
      this.ws = null;
      this.opened = false;
      this.finishing = false;
      this.done = false;
      this.pending = [];
      this.pendingBytes = 0;
      this.sentSamples = 0;
      this.marks = []; // [stream seconds sent, performance.now()] after each send
      this.lastError = null;
      this.metadataSeen = 0;
      this.offset = clockOffset;
      this.cleanups = [];
      this.timers = [];
    }

    url() {
      const params = new URLSearchParams({
        encoding: "linear16",
        sample_rate: String(TARGET_RATE),
        channels: "1",
        interim_results: "true",
        warnings: "true",
      });
      if (this.language) params.set("language", this.language);
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      return `${scheme}//${location.host}/v1/listen?${params}`;
    }

    open(onOpen) {
      const url = this.url();
      this.wsUrl = url;
      try {
        this.ws = this.key ? new WebSocket(url, ["token", this.key]) : new WebSocket(url);
      } catch (err) {
        this.fail(
          "The API key cannot be sent",
          "A browser can send only letters, digits and - _ . ! # $ % & ' * + ^ ` | ~ in a websocket subprotocol; check the key.",
        );
        return;
      }
      const ws = this.ws;
      ws.binaryType = "arraybuffer";
      this.timers.push(
        setTimeout(() => {
          if (!this.opened && !this.done) ws.close();
        }, OPEN_TIMEOUT_MS),
      );
      ws.onopen = () => {
        if (this.done) return;
        this.opened = true;
        record("open", { url });
        for (const chunk of this.pending) this.send(chunk);
        this.pending = [];
        this.pendingBytes = 0;
        onOpen();
      };
      ws.onmessage = (event) => this.onMessage(event);
      ws.onclose = (event) => this.onClose(event);
    }

    // Send a chunk of 16 kHz Int16 PCM (an ArrayBuffer), or hold it until
    // the websocket is open.
    audio(buffer) {
      if (this.done || this.finishing) return;
      if (!this.opened) {
        this.pending.push(buffer);
        this.pendingBytes += buffer.byteLength;
        while (this.pendingBytes > MAX_PENDING_S * TARGET_RATE * 2) {
          this.pendingBytes -= this.pending.shift().byteLength;
        }
        return;
      }
      this.send(buffer);
    }

    send(buffer) {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
      this.ws.send(buffer);
      this.sentSamples += buffer.byteLength / 2;
      const seconds = this.sentSamples / TARGET_RATE;
      this.marks.push([seconds, performance.now()]);
      while (this.marks.length > 2 && this.marks[0][0] < seconds - 120) this.marks.shift();
      ui.audioSent.textContent = `${seconds.toFixed(1)} s`;
    }

    // When the audio up to stream time `t` (seconds) had been sent.
    sentAt(t) {
      const marks = this.marks;
      let lo = 0;
      let hi = marks.length - 1;
      if (hi < 0 || marks[hi][0] < t - 0.001) return null;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (marks[mid][0] >= t - 0.001) hi = mid;
        else lo = mid + 1;
      }
      return marks[lo][1];
    }

    onMessage(event) {
      if (typeof event.data !== "string") return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      switch (message.type) {
        case "Metadata":
          this.metadataSeen += 1;
          this.requestId = message.request_id;
          showMetadata(message, this.metadataSeen > 1);
          record("metadata", { requestId: message.request_id, last: this.metadataSeen > 1 });
          break;
        case "Results":
          this.onResults(message);
          break;
        case "Warning":
          record("warning", { code: message.code, message: message.message });
          showNotice("warning", `Server warning: ${message.code}`, message.message || "");
          break;
        case "Error":
          record("error", { code: message.code, message: message.message });
          if (NON_FATAL.has(message.code)) {
            showNotice("warning", `Server notice: ${message.code}`, message.message || "");
          } else {
            this.lastError = message;
            showNotice("error", `The server ended the stream: ${message.code}`, message.message || "");
          }
          break;
        default:
          break; // SpeechStarted, UtteranceEnd, ConfigureFailure: nothing to show
      }
    }

    onResults(message) {
      const alt = (message.channel && message.channel.alternatives && message.channel.alternatives[0]) || {};
      const text = (alt.transcript || "").trim();
      const channel = Array.isArray(message.channel_index) ? message.channel_index[0] : 0;
      const start = Number(message.start || 0);
      const end = start + Number(message.duration || 0);
      const sentAt = this.sentAt(end);
      const latency = sentAt === null ? null : Math.max(0, performance.now() - sentAt);
      if (message.is_final) {
        const words = Array.isArray(alt.words) ? alt.words : [];
        const first = words.length ? Number(words[0].start) : start;
        const last = words.length ? Number(words[words.length - 1].end) : end;
        addFinal(channel, text, this.offset + first, this.offset + last);
        record("final", { channel, text, start, end, latency });
        if (latency !== null) this.finalLatency = latency;
      } else {
        showInterim(channel, text);
        record("interim", { channel, text, start, end, latency });
        if (latency !== null) this.interimLatency = latency;
      }
      const parts = [];
      if (this.finalLatency !== undefined) parts.push(`final ${Math.round(this.finalLatency)} ms`);
      if (this.interimLatency !== undefined) parts.push(`interim ${Math.round(this.interimLatency)} ms`);
      ui.latency.textContent = parts.join(" · ") || "–";
      ui.latency.title = "From the moment the audio of a result's end was sent to the moment its text arrived";
    }

    async onClose(event) {
      if (this.done) return;
      this.done = true;
      this.teardown();
      record("close", { code: event.code, reason: event.reason, opened: this.opened });
      clockOffset = this.offset + this.sentSamples / TARGET_RATE;
      if (session === this) session = null;
      if (!this.opened) {
        setState("connecting", "Connection refused: asking the server why…");
        const why = await explainRefusal(this.wsUrl, this.key);
        if (why && why.unreachable) {
          this.fail("Cannot reach the server", `${location.host} did not answer (${why.detail}).`);
        } else if (why) {
          const title = `The server refused the stream (HTTP ${why.status}${why.code ? ` ${why.code}` : ""})`;
          this.fail(title, sentences(why.message, hintFor(why.code, why.status, why.retryAfter)));
        } else {
          this.fail("The connection failed", "The server closed the websocket before the stream opened and gave no reason.");
        }
        return;
      }
      if (event.code === 1000) {
        setState("idle", this.kind === "file" ? "Done: the file is transcribed" : "Stopped");
        return;
      }
      const reason = CLOSE_REASONS[event.code] || "The stream ended abnormally.";
      if (this.lastError) {
        setState("error", `Stream ended (close code ${event.code})`);
        showNotice("error", `The server ended the stream: ${this.lastError.code}`, sentences(this.lastError.message, reason));
      } else {
        this.fail(`The stream ended (close code ${event.code}${event.reason ? `, ${event.reason}` : ""})`, reason);
      }
    }

    fail(title, text) {
      this.done = true;
      this.teardown();
      if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.close();
      if (session === this) session = null;
      showNotice("error", title, text);
      setState("error", "Error");
    }

    // Stop capturing, send what is left and CloseStream; the server answers
    // with the last finals, a last Metadata and close code 1000.
    finish() {
      if (this.done || this.finishing) return;
      if (!this.opened) {
        this.done = true;
        this.teardown();
        if (this.ws) this.ws.close();
        if (session === this) session = null;
        setState("idle", "Cancelled");
        return;
      }
      this.finishing = true;
      this.teardown();
      if (this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({ type: "CloseStream" }));
      setState("closing", "Finishing: waiting for the last words…");
      this.timers.push(
        setTimeout(() => {
          if (!this.done) this.ws.close();
        }, CLOSE_TIMEOUT_MS),
      );
    }

    teardown() {
      const cleanups = this.cleanups;
      this.cleanups = [];
      for (const fn of cleanups) {
        try {
          fn();
        } catch {
          // already released
        }
      }
      if (this.done) for (const timer of this.timers) clearTimeout(timer);
      setLevel(0);
    }
  }

  // --- the microphone ------------------------------------------------------

  const level = document.getElementById("level-bar");
  function setLevel(peak) {
    if (level) level.style.transform = `scaleX(${Math.min(1, peak * 1.4).toFixed(3)})`;
  }

  function micError(err) {
    const name = err && err.name;
    if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
      return [
        "Microphone access was denied",
        "Allow the microphone for this site in the browser's site settings and press Start again, or stream an audio file instead.",
      ];
    }
    if (name === "NotFoundError" || name === "OverconstrainedError" || name === "DevicesNotFoundError") {
      return ["No microphone found", "Connect a microphone, or stream an audio file instead."];
    }
    if (name === "NotReadableError" || name === "AbortError") {
      return ["The microphone could not be opened", "Another program may be using it. Close it and try again."];
    }
    return ["The microphone could not be started", String((err && err.message) || err)];
  }

  async function startMicrophone() {
    if (session) return;
    clearNotice();
    if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia || !window.AudioWorkletNode) {
      showNotice(
        "error",
        "The microphone needs a secure page",
        "Browsers give the microphone only to pages on https:// or on localhost. Open this page that way, or stream an audio file instead.",
      );
      setState("error", "Error");
      return;
    }
    const current = new Session("mic", ui.apiKey.value.trim(), ui.language.value);
    session = current;
    setState("connecting", "Asking for the microphone…");
    let media;
    try {
      // The raw signal: echo cancellation, noise suppression and automatic
      // gain change the audio in ways that cost the model accuracy.
      media = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
      });
    } catch (err) {
      const [title, text] = micError(err);
      record("mic-error", { name: err && err.name });
      current.fail(title, text);
      return;
    }
    if (current.done) {
      media.getTracks().forEach((t) => t.stop());
      return;
    }
    current.cleanups.push(() => media.getTracks().forEach((t) => t.stop()));
    let context;
    try {
      context = new AudioContext({ latencyHint: "interactive" });
      current.cleanups.push(() => context.close());
      await context.audioWorklet.addModule("/demo/worklet.js");
      const source = context.createMediaStreamSource(media);
      const node = new AudioWorkletNode(context, "earshot-capture", {
        numberOfInputs: 1,
        numberOfOutputs: 1,
        outputChannelCount: [1],
        channelCount: 1,
        channelCountMode: "explicit",
        channelInterpretation: "speakers",
        processorOptions: { targetRate: TARGET_RATE, chunkMs: CHUNK_MS },
      });
      node.port.onmessage = (event) => {
        const data = event.data;
        if (data.type === "audio") {
          current.audio(data.pcm);
          setLevel(data.peak);
        } else if (data.type === "flushed" && current.onFlushed) current.onFlushed();
      };
      source.connect(node);
      node.connect(context.destination); // the processor writes silence; this keeps it running
      current.worklet = node;
      current.cleanups.push(() => {
        source.disconnect();
        node.disconnect();
      });
      await context.resume();
    } catch (err) {
      if (!current.done) current.fail("The audio capture could not be started", String((err && err.message) || err));
      current.teardown();
      return;
    }
    if (current.done) {
      current.teardown(); // stopped while the capture started
      return;
    }
    current.micRate = context.sampleRate;
    record("capture", { rate: context.sampleRate });
    setState("connecting", "Connecting…");
    current.open(() => setState("streaming", "Listening: speak now"));
  }

  function stopMicrophone(current) {
    if (!current.opened || !current.worklet) {
      current.finish();
      return;
    }
    // Let the worklet send its last samples, then close the stream.
    const done = () => {
      current.onFlushed = null;
      current.finish();
    };
    current.onFlushed = done;
    current.worklet.port.postMessage("flush");
    current.timers.push(setTimeout(() => current.onFlushed && done(), 300));
  }

  // --- a file --------------------------------------------------------------

  async function decodeFile(file) {
    const data = await file.arrayBuffer();
    // decodeAudioData resamples to the context's rate: 16 kHz here.
    const context = new OfflineAudioContext(1, 1, TARGET_RATE);
    const audio = await context.decodeAudioData(data);
    const n = audio.length;
    const mono = new Float32Array(n);
    for (let c = 0; c < audio.numberOfChannels; c++) {
      const samples = audio.getChannelData(c);
      for (let i = 0; i < n; i++) mono[i] += samples[i] / audio.numberOfChannels;
    }
    const pcm = new Int16Array(n);
    for (let i = 0; i < n; i++) {
      const s = Math.max(-1, Math.min(1, mono[i]));
      pcm[i] = Math.round(s < 0 ? s * 32768 : s * 32767);
    }
    return pcm;
  }

  async function streamFile(file) {
    if (session || !file) return;
    clearNotice();
    const current = new Session("file", ui.apiKey.value.trim(), ui.language.value);
    session = current;
    setState("connecting", `Decoding ${file.name}…`);
    let pcm;
    try {
      pcm = await decodeFile(file);
    } catch (err) {
      record("file-error", { name: err && err.name });
      current.fail(
        "This file could not be decoded",
        `The browser cannot read ${file.name} as audio (${(err && err.message) || err}). Try a WAV, MP3, OGG or FLAC file.`,
      );
      return;
    }
    if (current.done) return;
    const total = pcm.length / TARGET_RATE;
    const step = Math.round(FILE_CHUNK_S * TARGET_RATE);
    let index = 0;
    let started = 0;
    const tick = () => {
      if (current.done || current.finishing) return;
      // Chunk k (audio from k to k + 1 chunk lengths) goes at k chunk lengths in.
      const due = Math.min(pcm.length, (Math.floor((performance.now() - started) / 1000 / FILE_CHUNK_S) + 1) * step);
      while (index < due) {
        const end = Math.min(pcm.length, index + step);
        current.send(pcm.slice(index, end).buffer);
        index = end;
      }
      setState("streaming", `Streaming ${file.name}: ${(index / TARGET_RATE).toFixed(1)} of ${total.toFixed(1)} s`);
      if (index >= pcm.length) current.finish();
      else current.timers.push(setTimeout(tick, FILE_CHUNK_S * 500));
    };
    setState("connecting", "Connecting…");
    current.open(() => {
      started = performance.now();
      tick();
    });
  }

  // --- wiring --------------------------------------------------------------

  ui.start.addEventListener("click", () => startMicrophone());
  ui.stop.addEventListener("click", () => {
    const current = session;
    if (!current) return;
    if (current.kind === "mic") stopMicrophone(current);
    else current.finish();
  });
  ui.file.addEventListener("change", () => {
    const file = ui.file.files && ui.file.files[0];
    if (file) streamFile(file).finally(() => (ui.file.value = ""));
  });
  ui.downloadTxt.addEventListener("click", () => download(transcriptText(), "text/plain;charset=utf-8", "txt"));
  ui.downloadSrt.addEventListener("click", () => download(transcriptSrt(), "application/x-subrip;charset=utf-8", "srt"));
  ui.clear.addEventListener("click", () => clearTranscript());
  window.addEventListener("pagehide", () => {
    if (session && session.ws) session.ws.close();
  });
  window.earshotDemo.transcriptText = transcriptText;
  window.earshotDemo.transcriptSrt = transcriptSrt;
  setState("idle", "Idle");
})();
