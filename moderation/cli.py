"""The ``moderation`` command. Other tools drive the system through it: names and formats are stable.

Exit codes: 0 success, 1 a pipeline error (message on stderr says what to
do), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from moderation.config import Device, Postprocess, ResizeMode, Settings
from moderation.errors import ConfigError, ModerationError


def _source(args, settings: Settings):
    from moderation.embedding import FolderSource, StoreSource

    if getattr(args, "images", None):
        folder = Path(args.images)
        if not folder.is_dir():
            raise ModerationError(f"--images {folder}: not a folder")
        return FolderSource(folder.resolve(), max_bytes=settings.max_file_bytes)
    if getattr(args, "prefix", None):
        return StoreSource(settings, args.prefix)
    raise ModerationError("give --images DIR (a local folder) or --prefix KEY_PREFIX (object store)")


def _add_images(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--images", metavar="DIR", help=f"folder of {what} (ids are file stems)")
    g.add_argument("--prefix", metavar="KEY_PREFIX", help=f"object-store prefix holding the {what}")


def _pipeline(settings: Settings):
    from moderation.jobs import Pipeline

    return Pipeline.open(settings)


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# -- commands ------------------------------------------------------------------------------


def cmd_stats_refresh(args, settings):
    from moderation.jobs import refresh_stats

    rec = refresh_stats(_pipeline(settings), _source(args, settings))
    _print({"stats_version": rec.version, "model_version": rec.model_version,
            "postprocess": rec.postprocess, "dims": [rec.in_dim, rec.out_dim],
            "n_background": rec.n_background})


def cmd_index_build(args, settings):
    from moderation.jobs import build_reference_index

    rec = build_reference_index(_pipeline(settings), _source(args, settings), full=args.full or None)
    _print({"index_version": rec.version, "model_version": rec.model_version,
            "stats_version": rec.stats_version, "count": rec.count, "factory": rec.factory,
            "build": rec.info.get("build"), "read": rec.info.get("read"), "changes": rec.info.get("changes")})


def cmd_calibrate(args, settings):
    if args.from_decisions:
        from moderation import feedback

        p = _pipeline(settings)
        _print(feedback.calibrate_from_decisions(p, store=args.store))
        return
    if not (args.images or args.prefix) or not args.ground_truth:
        raise _usage("calibrate needs --images DIR (or --prefix) and --ground-truth CSV, "
                     "or --from-decisions")
    from moderation.jobs import calibrate_labelled

    rec, metrics = calibrate_labelled(_pipeline(settings), _source(args, settings), Path(args.ground_truth),
                                      target_precision=args.precision, store=not args.dry_run)
    _print({"calibration_version": rec.version if not args.dry_run else None,
            "model_version": rec.model_version, "stats_version": rec.stats_version, **metrics})


def cmd_match(args, settings):
    from moderation.jobs import run_matching

    source = _source(args, settings)
    batch = args.batch or (str(Path(args.images).resolve()) if args.images else args.prefix)
    summary = run_matching(_pipeline(settings), source, batch,
                           candidates_out=Path(args.candidates_out) if args.candidates_out else None)
    _print(summary.__dict__)


def cmd_model_import(args, settings):
    from moderation.model_versions import import_torchscript

    p = _pipeline(settings)
    rec = import_torchscript(p.registry, Path(args.torchscript), name=args.name,
                             image_size=args.image_size, resize_mode=ResizeMode(args.resize_mode),
                             backbone=args.backbone, make_current=not args.no_promote)
    p.db.record_model(rec)
    _print({"model_version": rec.version, "dim": rec.dim, "current": not args.no_promote,
            "next": "run `moderation stats refresh` and `moderation index build` for this model"})


def cmd_model_promote(args, settings):
    from moderation.registry import Kind

    p = _pipeline(settings)
    rec = p.registry.manifest(Kind.MODEL, args.version)
    if not rec.metrics and not args.without_metrics:
        raise ConfigError(f"model {rec.version} carries no metrics or threshold (it was never evaluated); "
                          "evaluate it first (`moderation calibrate` after `stats refresh` and `index build` "
                          "pinned to it), or pass --without-metrics to promote it anyway")
    p.registry.set_current(Kind.MODEL, rec)
    p.db.record_model(rec)
    _print({"model_version": rec.version, "current": True, "threshold": rec.threshold,
            "next": "the statistics, index and matching DAGs follow the promotion; by hand: "
                    "`moderation stats refresh`, then `moderation index build`"})


def cmd_model_list(args, settings):
    from moderation.errors import NotFoundError
    from moderation.registry import Kind

    p = _pipeline(settings)
    try:
        current = p.registry.current(Kind.MODEL).version
    except NotFoundError:
        current = None
    rows = []
    for rec in p.registry.versions(Kind.MODEL):
        cal = None
        try:
            stats = p.registry.current(Kind.STATS, model_version=rec.version)
            c = p.current_calibration(rec, stats)
            cal = c.threshold if c else None
        except NotFoundError:
            pass
        rows.append({"version": rec.version, "current": rec.version == current, "source": rec.source,
                     "backbone": rec.backbone, "dim": rec.dim, "image_size": rec.image_size,
                     "raw_threshold": rec.threshold, "calibrated_threshold": cal,
                     "metrics": rec.metrics, "created_at": rec.created_at})
    if not rows:
        print("no model registered yet; the first job registers the default model", file=sys.stderr)
    _print(rows)


def cmd_db_upgrade(args, settings):
    from moderation.db import Database, upgrade

    applied = upgrade(Database(settings.database_url))
    _print({"applied": applied})


def cmd_review(args, settings):
    from moderation import review

    p = _pipeline(settings)
    if args.review_cmd == "list":
        _print(review.pending(p.db, limit=args.limit))
    elif args.review_cmd == "show":
        details = review.pair_details(p.db, args.pair_id)
        if args.urls:
            for key in ("evidence_key", "heatmap_key", "query_key", "reference_key"):
                if details.get(key):
                    try:
                        details[key.replace("_key", "_url")] = p.store.locate(details[key])
                    except ValueError:
                        pass  # a folder path outside the store: shown as the key itself
        _print(details)
    elif args.review_cmd == "claim":
        _print(review.claim(p.db, args.moderator, args.n, lease_seconds=settings.claim_lease_seconds))
    elif args.review_cmd == "release":
        _print(review.release(p.db, args.moderator, args.pair_id))
    elif args.review_cmd == "decide":
        _print(review.decide(p.db, args.pair_id, args.moderator, args.decision, note=args.note))
    elif args.review_cmd == "undo":
        _print(review.undo(p.db, args.moderator))


def cmd_bank(args, settings):
    from moderation import reference_controls as rc

    db = _pipeline(settings).db
    if args.bank_cmd == "list":
        _print(rc.bank_summaries(db))
    else:
        _print(rc.set_bank_enabled(db, args.name, args.bank_cmd == "enable", args.why, args.by))


def cmd_reference(args, settings):
    from moderation import reference_controls as rc

    db = _pipeline(settings).db
    if args.reference_cmd in ("disable", "enable"):
        _print(rc.set_reference_enabled(db, args.reference_id, args.reference_cmd == "enable", args.why, args.by))
    elif args.reference_cmd == "policy":
        _print(rc.set_reference_policy(db, args.reference_id, rc.Policy(args.policy), args.why,
                                       min_inliers=args.min_inliers, by=args.by))
    elif args.reference_cmd == "rejections":
        _print(rc.reference_rejections(db, limit=args.limit))
    elif args.reference_cmd == "log":
        _print(rc.control_log(db, target=args.target, limit=args.limit))


def cmd_evidence_prune(args, settings):
    from moderation import evidence

    _print(evidence.prune_evidence(_pipeline(settings), older_than_days=args.older_than_days))


def cmd_pdq_import(args, settings):
    from moderation import hash_banks
    from moderation.store import open_store

    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModerationError(f"cannot read {path}: {exc}") from None
    entries = hash_banks.parse_bank(text, hash_banks.BankFormat(args.format))
    record = hash_banks.import_bank(open_store(settings), args.bank, entries, source=path.name)
    _print(record.__dict__)


def cmd_pdq_export(args, settings):
    from moderation import hash_banks

    if args.bank == hash_banks.REFERENCES:
        from moderation.pdq import PdqIndex
        from moderation.pdq_matching import PDQ_FILE
        from moderation.registry import Kind

        p = _pipeline(settings)
        index = p.current_index(p.current_model())
        if PDQ_FILE not in index.files:
            raise ModerationError(f"index {index.version} has no PDQ hashes: rebuild it with MODERATION_PDQ on")
        entries = hash_banks.index_entries(PdqIndex.from_bytes(p.registry.load(Kind.INDEX, index, PDQ_FILE)))
    else:
        from moderation.store import open_store

        _, entries = hash_banks.load_bank(open_store(settings), args.bank)
    fmt = hash_banks.BankFormat(args.format)
    Path(args.file).write_text(hash_banks.format_bank(entries, fmt, bank=args.bank))
    _print({"bank": args.bank, "file": args.file, "format": fmt.value, "count": len(entries)})


def cmd_pdq_list(args, settings):
    from moderation import hash_banks
    from moderation.store import open_store

    store = open_store(settings)
    _print([hash_banks.current_version(store, name).__dict__ for name in hash_banks.list_banks(store)])


def cmd_gc(args, settings):
    from moderation.gc import collect_garbage

    report = collect_garbage(_pipeline(settings), grace_hours=args.grace_hours, dry_run=args.dry_run)
    _print(report.to_dict() if args.dry_run else report.summary())


def cmd_retro_match(args, settings):
    from moderation.retroactive import retro_match

    _print(retro_match(_pipeline(settings), days=args.days).summary())


def cmd_demo(args, settings):
    from moderation.jobs import build_reference_index, calibrate_labelled, refresh_stats, run_matching
    from moderation.embedding import FolderSource
    from moderation.samples import make_sample_set

    folder = Path(args.dir or settings.home / "demo-images")
    print(f"1/5 making sample images in {folder}", file=sys.stderr)
    sample = make_sample_set(folder, seed=args.seed)
    p = _pipeline(settings)
    print("2/5 fitting background statistics", file=sys.stderr)
    stats = refresh_stats(p, FolderSource(sample.background))
    print("3/5 building the reference index", file=sys.stderr)
    index = build_reference_index(p, FolderSource(sample.references))
    print("4/5 calibrating the threshold on the labelled queries", file=sys.stderr)
    cal, metrics = calibrate_labelled(p, FolderSource(sample.queries), sample.ground_truth)
    print("5/5 matching the query batch", file=sys.stderr)
    summary = run_matching(p, FolderSource(sample.queries), "demo",
                           candidates_out=settings.home / "demo-candidates.csv")
    from moderation import review

    top = review.pending(p.db, limit=5)
    _print({"model_version": summary.model_version, "stats_version": stats.version,
            "index_version": index.version, "metrics": metrics, "threshold": summary.threshold,
            "flagged": summary.n_flagged, "queries": summary.n_queries,
            "candidates_csv": str(settings.home / "demo-candidates.csv"),
            "database": settings.database_url, "store": settings.store_url, "top_pending": top})


def cmd_train(args, settings):
    from trainer import cli as trainer_cli

    code = trainer_cli.run(args, settings)
    if code:
        raise SystemExit(code)


def _usage(msg: str) -> SystemExit:
    print(f"moderation: error: {msg}", file=sys.stderr)
    return SystemExit(2)


def _add_change(p: argparse.ArgumentParser) -> None:
    p.add_argument("--why", required=True, help="the reason, kept in the change log")
    p.add_argument("--by", help="who makes the change (default: the database user; required on SQLite)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moderation",
        description="Image copy detection for content moderation. Settings come from MODERATION_* "
                    "environment variables (see README); with none set, state lives in ./.moderation.")
    parser.add_argument("--home", help="data folder for the embedded default (MODERATION_HOME)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="MODERATION_DEVICE")
    parser.add_argument("--batch-size", type=int, help="MODERATION_BATCH_SIZE")
    parser.add_argument("--workers", type=int, help="decoding processes (MODERATION_WORKERS)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stats = sub.add_parser("stats", help="background statistics").add_subparsers(dest="sub", required=True)
    p = stats.add_parser("refresh", help="fit and publish centering/whitening and the SN background set")
    _add_images(p, "background images")
    p.add_argument("--postprocess", choices=[m.value for m in Postprocess], help="MODERATION_POSTPROCESS")
    p.set_defaults(func=cmd_stats_refresh)

    index = sub.add_parser("index", help="reference index").add_subparsers(dest="sub", required=True)
    p = index.add_parser("build", help="embed the references and publish a new index version")
    _add_images(p, "reference images")
    p.add_argument("--factory", help="`auto` or a FAISS index_factory string (MODERATION_INDEX_FACTORY), default auto")
    p.add_argument("--full", action="store_true",
                   help="read every reference and rebuild from every vector, not only what the listing shows "
                        "changed (MODERATION_INDEX_FULL_REBUILD)")
    p.set_defaults(func=cmd_index_build)

    p = sub.add_parser("calibrate", help="evaluate on a labelled query set and store the 90%%-precision threshold")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--images", metavar="DIR", help="folder of labelled query images")
    g.add_argument("--prefix", metavar="KEY_PREFIX", help="object-store prefix of labelled queries")
    p.add_argument("--ground-truth", metavar="CSV", help="query_id,reference_id (empty reference: no copy)")
    p.add_argument("--precision", type=float, default=0.9, help="target precision (default 0.9)")
    p.add_argument("--dry-run", action="store_true", help="print metrics, store nothing")
    p.add_argument("--no-verify", action="store_true",
                   help="calibrate the global stage only (MODERATION_VERIFY=false)")
    p.add_argument("--from-decisions", action="store_true",
                   help="estimate precision from moderators' decisions instead of a labelled set")
    p.add_argument("--store", action="store_true", help="with --from-decisions: store the proposed threshold")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("match", help="match a query batch and write flagged pairs to the review table")
    _add_images(p, "query images")
    p.add_argument("--batch", help="batch name (default: the folder's path or the prefix); "
                                   "rerunning a batch replaces its run")
    p.add_argument("--candidates-out", metavar="CSV", help="write every candidate as query_id,reference_id,score")
    p.add_argument("--threshold", type=float, help="override the calibrated threshold (MODERATION_THRESHOLD)")
    p.add_argument("--no-verify", action="store_true",
                   help="global stage only: no local-feature verification (MODERATION_VERIFY=false)")
    p.set_defaults(func=cmd_match)

    model = sub.add_parser("model", help="model versions").add_subparsers(dest="sub", required=True)
    p = model.add_parser("import", help="register a TorchScript descriptor (e.g. a published SSCD file)")
    p.add_argument("--torchscript", required=True, metavar="FILE")
    p.add_argument("--name", help="version name (default: file stem + hash)")
    p.add_argument("--backbone", default="unknown", help="informational, e.g. resnet50")
    p.add_argument("--image-size", type=int, default=320, help="input size (SSCD: square 320 or short edge 288)")
    p.add_argument("--resize-mode", choices=[m.value for m in ResizeMode], default="square")
    p.add_argument("--no-promote", action="store_true", help="register without making it current")
    p.set_defaults(func=cmd_model_import)
    p = model.add_parser("promote", help="make a published model version the one in force")
    p.add_argument("version")
    p.add_argument("--without-metrics", action="store_true",
                   help="promote a version that was never evaluated (it then has no threshold of its own)")
    p.set_defaults(func=cmd_model_promote)
    p = model.add_parser("list", help="model versions with metrics and thresholds")
    p.set_defaults(func=cmd_model_list)

    db = sub.add_parser("db", help="review database").add_subparsers(dest="sub", required=True)
    db.add_parser("upgrade", help="apply pending schema migrations").set_defaults(func=cmd_db_upgrade)

    rv = sub.add_parser("review", help="the moderators' queue").add_subparsers(dest="review_cmd", required=True)
    p = rv.add_parser("list", help="pending pairs, highest score first")
    p.add_argument("--limit", type=int, default=20)
    p = rv.add_parser("show", help="one pair with its full context")
    p.add_argument("pair_id", type=int)
    p.add_argument("--urls", action="store_true", help="add presigned URLs (S3) or paths (local store)")
    p = rv.add_parser("claim", help="claim the next N pending pairs")
    p.add_argument("--moderator", required=True)
    p.add_argument("-n", type=int, default=10)
    p = rv.add_parser("release", help="give back a claimed pair")
    p.add_argument("--moderator", required=True)
    p.add_argument("pair_id", type=int)
    p = rv.add_parser("decide", help="record a decision on a pair")
    p.add_argument("pair_id", type=int)
    p.add_argument("--moderator", required=True)
    p.add_argument("--decision", required=True, choices=["confirmed", "rejected", "unsure"])
    p.add_argument("--note")
    p = rv.add_parser("undo", help="undo your own last decision")
    p.add_argument("--moderator", required=True)
    for name in ("list", "show", "claim", "release", "decide", "undo"):
        rv.choices[name].set_defaults(func=cmd_review)

    bk = sub.add_parser("bank", help="reference banks: list, switch off and on (from the next matching run)")
    bk = bk.add_subparsers(dest="bank_cmd", required=True)
    bk.add_parser("list", help="banks with their state, sizes, flagged counts and observed precision")
    for name, what in (("disable", "stop matching the bank's references"), ("enable", "match them again")):
        p = bk.add_parser(name, help=what)
        p.add_argument("name")
        _add_change(p)
    for name in ("list", "disable", "enable"):
        bk.choices[name].set_defaults(func=cmd_bank)

    rf = sub.add_parser("reference", help="single references: switch off and on, match policy, rejections")
    rf = rf.add_subparsers(dest="reference_cmd", required=True)
    for name, what in (("disable", "stop matching one reference"), ("enable", "match it again")):
        p = rf.add_parser(name, help=what)
        p.add_argument("reference_id")
        _add_change(p)
    p = rf.add_parser("policy", help="strict: flag only with enough inliers; suppress: never flag; normal: undo")
    p.add_argument("reference_id")
    p.add_argument("policy", choices=["normal", "strict", "suppress"])
    p.add_argument("--min-inliers", type=int,
                   help="strict only: the inliers needed (default MODERATION_STRICT_MIN_INLIERS)")
    _add_change(p)
    p = rf.add_parser("rejections", help="references with the most rejected pairs")
    p.add_argument("--limit", type=int, default=50)
    p = rf.add_parser("log", help="the change log of banks and references, newest first")
    p.add_argument("--target", help="one bank or reference")
    p.add_argument("--limit", type=int, default=100)
    for name in ("disable", "enable", "policy", "rejections", "log"):
        rf.choices[name].set_defaults(func=cmd_reference)

    ev = sub.add_parser("evidence", help="evidence images").add_subparsers(dest="sub", required=True)
    p = ev.add_parser("prune", help="remove evidence of decided pairs older than N days")
    p.add_argument("--older-than-days", type=int, help="default MODERATION_EVIDENCE_RETENTION_DAYS")
    p.set_defaults(func=cmd_evidence_prune)

    p = sub.add_parser("gc", help="remove superseded versions, half-written publishes, failed runs' artifacts, "
                                  "orphan and expired cached vectors, and evidence past retention")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, with sizes; change nothing")
    p.add_argument("--grace-hours", type=float, metavar="H",
                   help="leave anything written in the last H hours (default MODERATION_GC_GRACE_HOURS, 24)")
    p.set_defaults(func=cmd_gc)

    pdq = sub.add_parser("pdq", help="PDQ hash banks (ThreatExchange / HMA hash lists)").add_subparsers(
        dest="sub", required=True)
    p = pdq.add_parser("import", help="import a PDQ hash list as a bank (a new version; matched in every run)")
    p.add_argument("file", help="tx: 'pdq HASH' lines (threatexchange CLI) or bare hashes; pdq: 'HASH,QUALITY,NAME' "
                                "(pdq-photo-hasher); csv: `threatexchange dataset -P --csv` or a header naming the "
                                "hash column; hma: HMA bank API JSON, one object a line")
    p.add_argument("--bank", required=True, help="bank name (letters, digits, _ . -)")
    p.add_argument("--format", choices=["auto", "tx", "hashes", "pdq", "csv", "hma"], default="auto",
                   help="default: decided from the first line")
    p.set_defaults(func=cmd_pdq_import)
    p = pdq.add_parser("export", help="write a bank (or, with --bank references, the indexed references' hashes)")
    p.add_argument("--bank", required=True)
    p.add_argument("file")
    p.add_argument("--format", choices=["tx", "hashes", "pdq", "csv", "hma"], default="csv",
                   help="tx: for a threatexchange local_file collaboration; hashes: for `threatexchange match "
                        "--hashes`; pdq: for the PDQ reference tools; hma: POST bodies for HMA's "
                        "/c/bank/NAME/signal")
    p.set_defaults(func=cmd_pdq_export)
    pdq.add_parser("list", help="the banks in force").set_defaults(func=cmd_pdq_list)

    p = sub.add_parser("retro-match", help="search recent query batches for copies of references indexed since "
                                           "they were matched, and flag them as retroactive pairs")
    p.add_argument("--days", type=int, metavar="N",
                   help="window of daily batches (default MODERATION_RETRO_WINDOW_DAYS, 30)")
    p.set_defaults(func=cmd_retro_match)

    p = sub.add_parser("demo", help="make sample images and run the whole pipeline on them")
    p.add_argument("--dir", help="where to write the sample images (default HOME/demo-images)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train or fine-tune a descriptor (see trainer/)")
    try:
        from trainer import cli as trainer_cli

        trainer_cli.add_arguments(p)
    except ImportError:
        pass
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        overrides = {"home": Path(args.home) if args.home else None, "device": Device(args.device) if args.device else None,
                     "batch_size": args.batch_size, "workers": args.workers,
                     "progress": False if args.quiet else None}
        if getattr(args, "postprocess", None):
            overrides["postprocess"] = Postprocess(args.postprocess)
        if getattr(args, "factory", None):
            overrides["index_factory"] = args.factory
        if getattr(args, "threshold", None) is not None:
            overrides["threshold"] = args.threshold
        if getattr(args, "no_verify", False):
            overrides["verify"] = False
        settings = Settings.from_env(**overrides)
        args.func(args, settings)
    except ModerationError as exc:
        print(f"moderation: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moderation: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
