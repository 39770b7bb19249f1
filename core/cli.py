"""``facereid`` command line: the demo (ingest -> retrain -> verify) and pair-list chores.

Flows run in-process; without ``PREFECT_API_URL`` Prefect starts an ephemeral server for
the run, so the demo needs nothing but the virtualenv.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.settings import PRECISIONS


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_ingest(args: argparse.Namespace) -> int:
    from flows.ingest_lfw import ingest_lfw

    _print(ingest_lfw(data_home=args.data_home, download_if_missing=args.download))
    return 0


MODEL_NAMES = ("pca", "siamese")


def model_list(value: str) -> list[str]:
    """argparse type of --models / --view2: comma-separated model names ('' = none)."""
    names = [m.strip().lower() for m in value.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODEL_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown model(s) {', '.join(unknown)}: use {', '.join(MODEL_NAMES)}"
        )
    return list(dict.fromkeys(names))


def cmd_retrain(args: argparse.Namespace) -> int:
    from flows.retrain import retrain

    if not args.models:
        raise ValueError("--models names no model: use pca, siamese or both")
    kwargs: dict[str, Any] = {"models": args.models}
    if args.view2 is not None:
        kwargs["view2_models"] = args.view2
    if args.siamese_epochs is not None:
        kwargs["siamese_epochs"] = args.siamese_epochs
    if args.siamese_max_train_seconds is not None:
        kwargs["siamese_max_train_seconds"] = args.siamese_max_train_seconds
    if args.siamese_mixed_precision:
        kwargs["siamese_mixed_precision"] = True
    if args.backend:
        kwargs["backend"] = args.backend
    _print(retrain(**kwargs))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from flows.verify_pairs import verify_pairs

    out = verify_pairs(list_key=args.list_key, model_name=args.model, precision=args.precision)
    _print(out)
    if args.list_key and not any(p["list_key"] == args.list_key for p in out["processed"]):
        return _explain_unverified(args.list_key, out)
    for rejected in out["rejected"]:  # a cron wrapper sees rejections in the exit code
        _say_rejected(rejected)
    return 1 if out["rejected"] else 0


def _say_rejected(rejected: dict[str, Any]) -> None:
    print(
        f"facereid verify: {rejected['list_key']} was rejected ({rejected['error']}); it is "
        f"now at {rejected['rejected_key']}",
        file=sys.stderr,
    )


def _explain_unverified(list_key: str, out: dict[str, Any]) -> int:
    """Why a named list got no results this run: 0 when it has results already, else 1."""
    from core.ledger import is_processed
    from core.storage import ObjectNotFound, get_storage

    for rejected in out["rejected"]:
        if rejected["list_key"] == list_key:
            _say_rejected(rejected)
            return 1
    storage = get_storage()
    try:
        info = storage.head(list_key)
    except ObjectNotFound:
        print(f"facereid verify: {storage.url_for(list_key)} does not exist", file=sys.stderr)
        return 1
    if is_processed(storage, info.key, info.etag):
        stem = list_key.removeprefix("incoming/").rsplit(".", 1)[0]
        print(f"{list_key} was verified already: facereid results {stem}", file=sys.stderr)
        return 0
    print(f"facereid verify: {list_key} was not verified (see the log above)", file=sys.stderr)
    return 1


def cmd_drop(args: argparse.Namespace) -> int:
    from core.cli_verify import drop_pair_list
    from core.storage import get_storage

    key = drop_pair_list(get_storage(), Path(args.path), name=args.name, force=args.force)
    print(f"dropped {args.path} as {key}")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from core.cli_verify import fetch_latest_results
    from core.storage import get_storage

    out = fetch_latest_results(get_storage(), args.list_stem, Path(args.dest))
    print(f"latest results for {args.list_stem}: {out}")
    return 0


def demo_pair_list(storage: Any, n_pairs: int) -> bytes:
    """A labelled pair list (CSV) from the View 1 DevTest pairs of the ingested dataset."""
    import io

    from core.dataset import latest_version, read_protocol

    table = read_protocol(storage, latest_version(storage), "pairs_view1_test").to_pandas()
    table = table.sample(n=min(n_pairs, len(table)), random_state=0).sort_values("pair_index")
    out = table.assign(
        pair_id=[f"dev-{i}" for i in table["pair_index"]],
        image_a="lfw:" + table["image_id_a"],
        image_b="lfw:" + table["image_id_b"],
    )[["pair_id", "image_a", "image_b", "label"]]
    buf = io.StringIO()
    out.to_csv(buf, index=False)
    return buf.getvalue().encode()


def cmd_demo(args: argparse.Namespace) -> int:
    """Ingest LFW, retrain both models, drop a labelled pair list and verify it."""
    from core.settings import get_settings
    from core.storage import get_storage
    from flows.ingest_lfw import ingest_lfw
    from flows.retrain import retrain
    from flows.verify_pairs import verify_pairs

    settings = get_settings()
    storage = get_storage(settings)
    print(f"[demo] storage={storage.uri} backend={settings.backend} lfw={settings.lfw_data_home}")
    print("[demo] 1/3 ingest LFW")
    _print(ingest_lfw(download_if_missing=args.download))
    print("[demo] 2/3 retrain PCA and Siamese")
    _print(
        retrain(
            siamese_epochs=args.siamese_epochs,
            siamese_max_train_seconds=args.siamese_max_train_seconds,
            view2_models=args.view2,
        )
    )
    print("[demo] 3/3 verify a dropped pair list")
    # a new name per demo: the ledger never verifies an unchanged list twice, and a re-run
    # demo should verify with the model it just promoted
    stem = f"demo/view1-devtest-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    key = f"incoming/{stem}.csv"
    storage.put_bytes(key, demo_pair_list(storage, args.pairs), "text/csv")
    _print(verify_pairs(list_key=key))
    print(f"[demo] done: results under {storage.url_for(f'results/{stem}/')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facereid",
        description="Face re-identification on LFW: ingest, retrain, verify (env: FACEREID_*).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="ingest -> retrain -> verify on the configured storage")
    p.add_argument(
        "--siamese-epochs", type=int, default=8, help="Siamese training epochs (default: 8)"
    )
    p.add_argument(
        "--siamese-max-train-seconds",
        type=int,
        default=900,
        help="Siamese training budget in seconds; dominates the demo's duration (default: 900)",
    )
    p.add_argument(
        "--view2",
        type=model_list,
        default=["pca"],
        help="comma list of models that also run the 10-fold View 2 protocol ('' = none)",
    )
    p.add_argument("--pairs", type=int, default=1000, help="pairs in the demo list (max 1000)")
    p.add_argument("--download", action="store_true", help="download LFW if missing")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ingest", help="run the ingest_lfw flow")
    p.add_argument("--data-home", default=None, help="sklearn data_home (default: settings)")
    p.add_argument("--download", action="store_true", help="download LFW if missing")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("retrain", help="run the retrain flow")
    p.add_argument(
        "--models", type=model_list, default=["pca", "siamese"], help="comma list: pca,siamese"
    )
    p.add_argument(
        "--backend",
        choices=["local", "sagemaker"],
        default=None,
        help="where training runs (default: FACEREID_BACKEND, else local)",
    )
    p.add_argument(
        "--siamese-epochs", type=int, default=None, help="Siamese training epochs (default: 20)"
    )
    p.add_argument(
        "--siamese-max-train-seconds",
        type=int,
        default=None,
        help="Siamese training budget in seconds (default: 1800)",
    )
    p.add_argument(
        "--siamese-mixed-precision",
        action="store_true",
        help="train the Siamese net in bfloat16 (the weekly deployment's recipe)",
    )
    p.add_argument(
        "--view2",
        type=model_list,
        default=None,
        help="comma list of models that run View 2 (default: pca; '' = none)",
    )
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser(
        "verify",
        help="run the verify_pairs flow on incoming/ lists",
        description="Verify the unprocessed pair lists under incoming/ (or one). Exit 0: "
        "all verified (or nothing to do); 1: a list was rejected (moved to rejected/) or "
        "the named list got no results; 2: an error such as no promoted model.",
    )
    p.add_argument("--list-key", default=None, help="process only this key (incoming/...)")
    p.add_argument("--model", default="auto", help="model name, or auto = best in production")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="Siamese inference precision (default: FACEREID_INFERENCE_PRECISION, auto)",
    )
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("drop", help="validate a local pair list and upload it to incoming/")
    p.add_argument("path", help="CSV or Parquet with image_a, image_b[, pair_id, label]")
    p.add_argument("--name", default=None, help="object name under incoming/ (default: file name)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a list of that name even if no run has verified it yet",
    )
    p.set_defaults(func=cmd_drop)

    p = sub.add_parser("results", help="download the latest results of a list")
    p.add_argument(
        "list_stem",
        help="list path under incoming/ without extension, e.g. my-pairs or team/my-pairs",
    )
    p.add_argument("--dest", default=".", help="local directory to write into")
    p.set_defaults(func=cmd_results)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, OSError, RuntimeError) as exc:  # OSError: missing file, permissions
        print(f"facereid {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
