"""The ``multigen`` command: ``serve``, ``worker``, ``models init``, ``users add``."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from .config import Config, check_model_files, load_config
from .errors import ConfigError, MultigenError
from .logs import setup_logging

log = logging.getLogger("multigen.service.cli")


def _built_before(out: Path) -> bool:
    """Whether ``out`` holds every model the first ``build_default_models`` wrote (the ones
    ``build_missing_models`` does not add): then only the models added since are built."""
    from multigen.pipes import model_builder as mb

    folders = (mb.CONTROLNET_DIR, mb.SD_SINGLE_CONFIG)
    files = (f"{mb.SD_DIR}/model_index.json", f"{mb.SDXL_DIR}/model_index.json", mb.SD_LORA, mb.SDXL_LORA,
             mb.SD_SINGLE_FILE)
    return all((out / d).is_dir() for d in folders) and all((out / f).is_file() for f in files)


def _models_init(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from multigen.pipes.model_builder import build_default_models, build_missing_models

    if args.dir:
        out = Path(args.dir)
    else:
        out = load_config(args.config, check_models_exist=False).model_dir
    if not (args.rebuild or args.full_size) and _built_before(out):
        # a folder built before: add the models added since (tiny-flux, ...), leave the others alone
        _quiet_libraries()
        paths = build_missing_models(out, seed=args.seed)
        print(f"{out}: already built; " + (f"added {', '.join(paths)}" if paths else "nothing missing")
              + " (--rebuild writes every model again)")
        for name, path in paths.items():
            print(f"{name}: {path}")
        return 0
    from multigen.pipes.tiny import TINY_MODELS

    steps = ["SD pipeline", "SDXL pipeline", "ControlNet", "LoRA files", "single-file checkpoint"]
    if args.full_size:
        steps += [f"{m.name} model (full size)" for m in TINY_MODELS if m.full_build is not None]
    else:
        steps += [f"{m.name} model" for m in TINY_MODELS]
    with tqdm(total=len(steps), desc="models init", unit="part", file=sys.stderr) as bar:
        def tick(label: str) -> None:
            # a step's label moves the bar on; the details within a step (a full-size model's shards) only show
            if label in steps and (bar.n or label != steps[0]):
                bar.update(1)
            bar.set_postfix_str(label)

        _quiet_libraries()
        paths = build_default_models(out, seed=args.seed, full_size=args.full_size, progress=tick)
        bar.update(bar.total - bar.n)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def ensure_models(config: Config) -> None:
    """Build the default models into ``model_dir`` when that folder does not exist yet (first run) and a
    listed model lives there (the packaged config lists only the built-in demo model: nothing to build)."""
    entries = [e for section in (config.models.base, config.models.lora, config.models.controlnet)
               for e in section.values()]
    if not config.model_dir.exists() and any(e.path.is_relative_to(config.model_dir) for e in entries):
        from multigen.pipes.model_builder import build_default_models

        log.info("model folder %s is missing: building the default models (first run)", config.model_dir)
        _quiet_libraries()
        build_default_models(config.model_dir)
    check_model_files(config.models)


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config, check_models_exist=False)
    if args.host:
        config.server.host = args.host
    if args.port is not None:
        config.server.port = args.port
    if args.threads:
        config.server.threads = args.threads
    logfile = setup_logging(config.logging_folder)
    ensure_models(config)
    from .server import run_server

    log.info("logging to %s", logfile)
    return run_server(config)


def _worker(args: argparse.Namespace) -> int:
    from .workerproc import check_worker_config, run_worker

    config = load_config(args.config, check_models_exist=False)
    check_worker_config(config)
    logfile = setup_logging(config.logging_folder)
    ensure_models(config)

    log.info("logging to %s", logfile)
    return run_worker(config)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multigen", description="Session-based image generation server.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the HTTP server")
    s.add_argument("--config", help="config.yaml (default: $MULTIGEN_CONFIG, else config/config.yaml of the repository, "
                                        "else the packaged one: the demo model, data in ~/.multigen)")
    s.add_argument("--host", help="address to bind (default from config: 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default from config: 8000; 0 picks a free one)")
    s.add_argument("--threads", type=int, help="waitress worker threads")
    s.set_defaults(func=_serve)

    w = sub.add_parser("worker", help="run device workers only (no HTTP) on a host sharing the API host's "
                                      "PostgreSQL store (docs/deploy.md)")
    w.add_argument("--config", help="this host's config.yaml (its `store:` is the API host's database)")
    w.set_defaults(func=_worker)

    m = sub.add_parser("models", help="manage models")
    msub = m.add_subparsers(dest="models_command", required=True)
    mi = msub.add_parser("init", help="build the small default models locally (no download); on a folder "
                                      "built before, only the models added since")
    mi.add_argument("--dir", help="destination (default: model_dir of the config)")
    mi.add_argument("--config", help="config.yaml whose model_dir to use")
    mi.add_argument("--full-size", action="store_true",
                    help="SD 1.5-, SDXL-, FLUX.1-dev- and Qwen-Image-shaped random weights (about 105 GB; "
                         "for GPU benchmarks)")
    mi.add_argument("--seed", type=int, default=1234, help="same seed, byte-identical files")
    mi.add_argument("--rebuild", action="store_true",
                    help="write every model again, even into a folder built before")
    mi.set_defaults(func=_models_init)

    u = sub.add_parser("users", help="manage API users")
    usub = u.add_subparsers(dest="users_command", required=True)
    ua = usub.add_parser("add", help="create a user and print a new token (last line)")
    ua.add_argument("name")
    ua.add_argument("--config", help="config.yaml to add the user to")
    ua.set_defaults(func=_users_add)
    uw = usub.add_parser("webhook-secret", help="print the secret a user's webhooks are signed with (without "
                         "users: the server's)")
    uw.add_argument("name")
    uw.add_argument("--rotate", action="store_true", help="make a new one: deliveries from now on use it")
    uw.add_argument("--config", help="the server's config.yaml")
    uw.set_defaults(func=_users_webhook_secret)
    return p


def _users_add(args: argparse.Namespace) -> int:
    from .users import add_user

    token = add_user(args.config, args.name)
    print(f"user {args.name} added; keep this token, it is shown only once:")
    print(token)
    return 0


def _users_webhook_secret(args: argparse.Namespace) -> int:
    from .webhooks import admin_secret

    print(admin_secret(load_config(args.config, check_models_exist=False), args.name, args.rotate))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"multigen: configuration error: {e}", file=sys.stderr)
        return 2
    except MultigenError as e:  # e.g. a bad user name for `users add`
        print(f"multigen: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
