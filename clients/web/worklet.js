// Earshot demo: the AudioWorklet that turns microphone audio into what the
// server expects: mono, 16 kHz, 16-bit little-endian PCM (encoding=linear16).
//
// The browser mixes the input down to one channel (the node is created with
// channelCount 1, "speakers" interpretation). This processor resamples from
// the audio context's rate (usually 44.1 or 48 kHz) to 16 kHz with a
// windowed-sinc low-pass interpolator, converts to Int16 and posts chunks of
// `chunkMs` milliseconds to the page as transferable ArrayBuffers, each with
// the peak level of its samples (for the page's level meter).
//
// Messages from the page: "flush" sends what is left (the resampler's tail
// and a last, shorter chunk), then {type: "flushed"}; the processor then
// stops.
"use strict";

// Streaming windowed-sinc resampler (Blackman window, 8 zero crossings of the
// low-pass kernel either side, cut-off at 92 % of the lower Nyquist rate).
class Resampler {
  constructor(inRate, outRate) {
    this.step = inRate / outRate; // input samples per output sample
    this.passthrough = inRate === outRate;
    const fc = 0.5 * Math.min(1, outRate / inRate) * 0.92; // cycles per input sample
    this.half = Math.ceil(8 / (2 * fc)); // kernel half-width, in input samples
    this.res = 64; // table points per input sample
    const size = this.half * this.res + 2;
    this.table = new Float32Array(size);
    for (let i = 0; i < size; i++) {
      const t = i / this.res;
      if (t >= this.half) break;
      const x = 2 * fc * t;
      const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
      const a = (Math.PI * t) / this.half;
      const window = 0.42 + 0.5 * Math.cos(a) + 0.08 * Math.cos(2 * a);
      this.table[i] = 2 * fc * sinc * window;
    }
    // Input history; `pos` is the next output's position in it. It starts
    // `half` zeros in, so that output 0 lines up with input sample 0.
    this.buf = new Float32Array(8192);
    this.len = this.half;
    this.pos = this.half;
  }

  kernel(t) {
    const x = Math.abs(t) * this.res;
    const i = x | 0;
    if (i + 1 >= this.table.length) return 0;
    return this.table[i] + (x - i) * (this.table[i + 1] - this.table[i]);
  }

  append(input) {
    if (this.len + input.length > this.buf.length) {
      const grown = new Float32Array(Math.max(this.buf.length * 2, this.len + input.length));
      grown.set(this.buf.subarray(0, this.len));
      this.buf = grown;
    }
    this.buf.set(input, this.len);
    this.len += input.length;
  }

  // Resample `input`, calling emit(sample) for each output sample; outputs
  // stop `half` input samples before the end of what has arrived (the
  // kernel needs them) unless `limit` says where the real input ends.
  push(input, emit, limit) {
    if (this.passthrough) {
      for (let i = 0; i < input.length; i++) emit(input[i]);
      return;
    }
    this.append(input);
    const end = limit === undefined ? this.len - this.half : limit;
    const buf = this.buf;
    const half = this.half;
    while (this.pos < end) {
      const c = Math.floor(this.pos);
      const frac = this.pos - c;
      let acc = 0;
      for (let k = 1 - half; k <= half; k++) acc += buf[c + k] * this.kernel(k - frac);
      emit(acc);
      this.pos += this.step;
    }
    const drop = Math.floor(this.pos) - half;
    if (drop > 0) {
      buf.copyWithin(0, drop, this.len);
      this.len -= drop;
      this.pos -= drop;
    }
  }

  // Emit the outputs still held back, up to the end of the input so far.
  flush(emit) {
    if (this.passthrough) return;
    const end = this.len;
    this.push(new Float32Array(this.half + 1), emit, end);
  }
}

class EarshotCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    const target = opts.targetRate || 16000;
    this.chunkSamples = Math.max(1, Math.round((target * (opts.chunkMs || 50)) / 1000));
    this.resampler = new Resampler(sampleRate, target);
    this.chunk = new Int16Array(this.chunkSamples);
    this.fill = 0;
    this.peak = 0;
    this.running = true;
    this.emit = (x) => {
      const s = x < -1 ? -1 : x > 1 ? 1 : x;
      const a = s < 0 ? -s : s;
      if (a > this.peak) this.peak = a;
      this.chunk[this.fill++] = Math.round(s < 0 ? s * 32768 : s * 32767);
      if (this.fill === this.chunkSamples) this.post();
    };
    this.port.onmessage = (event) => {
      if (event.data === "flush" && this.running) {
        this.running = false;
        this.resampler.flush(this.emit);
        this.post();
        this.port.postMessage({ type: "flushed" });
      }
    };
  }

  post() {
    if (this.fill === 0) return;
    const pcm = this.chunk.slice(0, this.fill).buffer;
    this.port.postMessage({ type: "audio", pcm, peak: this.peak }, [pcm]);
    this.fill = 0;
    this.peak = 0;
  }

  process(inputs) {
    if (!this.running) return false;
    const input = inputs[0];
    if (input && input.length > 0) this.resampler.push(input[0], this.emit);
    return true;
  }
}

registerProcessor("earshot-capture", EarshotCapture);
