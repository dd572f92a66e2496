"""``python -m benchmarks``: the options, the inputs, the run order of the phases, and the two reports."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from agegender.errors import AgeGenderError
from agegender.files import write_text_atomic

from .inputs import bench_home, bench_weights, build_tree, faces_dir, labelled_photos, spread
from .machine import loadavg, machine_info
from .peer import bracket, run_peer
from .phases import AFTER_TRAIN, GROUPS, PHASES, child, previous_run, run_phase
from .report import render_markdown
from .sizes import PEER, SIZES, TARGETS, TREE_SIDE, Sizes
from .summary import best, summarise

log = logging.getLogger("benchmarks")

PROG = "python -m benchmarks"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Measure every benchmark figure; write BENCHMARKS.md and bench.json.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_const", dest="mode", const="quick", help="a reduced version of every figure (1-3 minutes)"
    )
    mode.add_argument(
        "--tiny",
        action="store_const",
        dest="mode",
        const="tiny",
        help="smallest run, tiny channel widths: checks the machinery only (tests)",
    )
    p.add_argument(
        "--out",
        default=str(bench_home() / "report"),
        help="where BENCHMARKS.md and bench.json go (default: %(default)s; `--out .` rewrites the repository's BENCHMARKS.md)",
    )
    p.add_argument(
        "--work",
        default=str(bench_home() / "work"),
        help="cache of the generated tree, weights and peer venv (default: %(default)s)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--faces",
        help="real photos (default: $AGEGENDER_FACES, else ../shared/faces beside the "
        "checkout as the tests find it, else synthetic faces)",
    )
    p.add_argument("--synthetic", action="store_true", help="generated faces even where real photos are found")
    p.add_argument("--no-peer", action="store_true", help=f"skip the {PEER} comparison")
    p.add_argument(
        "--reuse",
        nargs="*",
        metavar="PHASE",
        choices=[*PHASES, "peer"],
        help="keep these phases (none named: all) from --out's bench.json where they succeeded in the "
        "same mode, and run the rest; phases that share state are kept or rerun together",
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="PHASE",
        choices=[*PHASES, "peer"],
        help="run only the phase groups holding these phases (e.g. --only accuracy); the others are kept "
        "from --out's bench.json where it has them in the same mode, else reported as not run",
    )
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.set_defaults(mode="full")
    return p


def selected(a: argparse.Namespace) -> list[tuple[str, ...]]:
    """The phase groups this invocation runs (``--only``: those holding a named phase)."""
    return [g for g in GROUPS if not a.only or set(g) & set(a.only)]


def prepare(a: argparse.Namespace, sizes: Sizes, device: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The phases' shared context (tree, weights, photo sets, sizes) and what the report says about the data."""
    from agegender.data.records import scan
    from agegender.train.config import TrainConfig

    work = Path(a.work).resolve()
    faces = faces_dir(a.faces, a.synthetic)
    photos = labelled_photos(faces) if faces else []
    if photos:
        log.info("real photos from %s", faces)
    else:
        log.warning("no real photos (--faces, $AGEGENDER_FACES or ../shared/faces): the tree uses synthetic faces")
    tree: Path | None = None
    weights: Path | None = None
    if any(n != "accuracy" for g in selected(a) for n in g):  # figure 7 reads the real photos only
        tree = build_tree(
            work / f"tree-{'photos' if photos else 'synthetic'}-{sizes.images}", sizes.images, spread(photos, sizes.images)
        )
        widths = sizes.widths
        weights = bench_weights(work / f"vgg-face-bench-{'-'.join(map(str, widths)) if widths else 'vgg16'}.safetensors", widths)
    photo_paths = [str(p.path) for p in photos]
    lfw = sorted(str(p) for p in (faces / "lfw").glob("*.jpg")) if faces else []
    predict_paths = spread(lfw or photo_paths, sizes.predict_images)
    if not predict_paths and tree is not None:
        predict_paths = spread([str(x.path) for x in scan(tree).records], sizes.predict_images)
    sizes_doc = asdict(sizes)
    sizes_doc["hidden"] = list(sizes.hidden or TrainConfig.hidden)
    ctx: dict[str, Any] = {
        "tree": tree and str(tree),
        "weights": weights and str(weights),
        "work": str(work),
        "device": device,
        "sizes": sizes_doc,
        "cache_dir": str(work / f"cache-{a.mode}"),
        "run_dir": str(work / f"run-{a.mode}"),
        "photos": spread(photo_paths or predict_paths, 2 * sizes.quant_images),
        "photo_genders": {str(p.path): p.gender for p in photos},
        "predict_paths": predict_paths,
        "faces": str(faces) if faces else None,
        "mode": a.mode,
        "peer": not a.no_peer,
    }
    source = f"{len(photos):,} labelled photos from the faces folder" if photos else "synthetic.render_face images"
    data = (
        f"an agegender_cleaned-layout tree of {sizes.images:,} {TREE_SIDE}x{TREE_SIDE} JPEGs made from {source}"
        if tree
        else "no benchmark tree (this invocation ran figure 7 only, on the real photos)"
    )
    about = {
        "faces": faces,
        "sizes_doc": sizes_doc,
        "data": data,
        "predict_set": f"{len(predict_paths)} "
        + (
            "LFW photos (evenly spaced through the sorted folder)"
            if lfw
            else "photos"
            if photo_paths
            else "synthetic tree images"
        ),
    }
    return ctx, about


def run_all(a: argparse.Namespace, ctx: dict[str, Any], stamp: dict[str, str]) -> dict[str, Any]:
    """Every phase group in order, each either rerun or kept whole from ``--out``'s bench.json (``--reuse``)."""
    raw: dict[str, Any] = {}
    work = Path(ctx["work"])

    def run_one(name: str) -> dict[str, Any]:
        if name == "peer":
            return {"error": "skipped (--no-peer)"} if a.no_peer else run_peer(work / "peer-venv", ctx["predict_paths"])
        tp, checkpoint = raw.get("throughput", {}), raw.get("train", {}).get("checkpoint")
        if "grid" in tp:
            ctx["extract_bf16"] = best(tp, "bf16", "raw")["raw"] > best(tp, "fp32", "raw")["raw"]
        if name in ("inference", "predict"):
            if checkpoint is None:
                return {"error": "no trained checkpoint (the train phase failed)"}
            ctx["checkpoint"] = checkpoint
        result = run_phase(name, ctx)
        if name == "predict" and "images_per_second" in raw.get("peer", {}):
            # The peer runs before and after predict, so a change in the machine's load hits both sides.
            raw["peer"] = bracket(raw["peer"], run_one("peer"))
        return result

    previous = previous_run(Path(a.out) / "bench.json", a.mode) if a.reuse is not None or a.only else {}
    wanted = set(a.reuse or [*PHASES, "peer"]) if a.reuse is not None else set()
    chain_reused = False
    for i, group in enumerate(GROUPS):
        if group not in selected(a):
            for name in group:  # --only: kept as measured before, or said to be not run
                kept = previous.get(name, {})
                raw[name] = kept if "measured" in kept else {"skipped": f"not run (--only {' '.join(a.only)})"}
            continue
        reuse = all(name in wanted and "measured" in previous.get(name, {}) and "error" not in previous[name] for name in group)
        if i == 1:
            reuse = chain_reused = reuse and Path(previous["train"].get("checkpoint", "")).is_file()
        elif AFTER_TRAIN & set(group):
            reuse = reuse and chain_reused
        for name in group:
            if reuse:
                log.info("phase %s: reusing the result of %s", name, previous[name]["measured"]["date"])
            raw[name] = previous[name] if reuse else {**run_one(name), "measured": stamp}
    shutil.rmtree(ctx["cache_dir"], ignore_errors=True)
    return raw


def main(argv: Sequence[str] | None = None) -> int:
    """Run every figure and write ``BENCHMARKS.md`` and ``bench.json``; returns 1 when a phase failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser().parse_args(argv)
    if a.phase:
        return child(a.phase, a.spec, a.result)
    import torch

    from agegender.train.config import PRESETS, TrainConfig

    started = time.perf_counter()
    sizes, device = SIZES[a.mode], a.device
    if device == "cuda" and not torch.cuda.is_available():
        log.warning("--device cuda: no GPU available; running on the CPU")
        device = "cpu"
    machine = machine_info(device)
    ctx, about = prepare(a, sizes, device)
    found = " (faces from $AGEGENDER_FACES)" if os.environ.get("AGEGENDER_FACES") else " (faces from ../shared/faces)"
    command = f"{PROG} " + shlex.join(argv) + (found if about["faces"] and not a.faces else "")
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": command}
    raw = run_all(a, ctx, stamp)

    machine["load_average_end"] = loadavg()
    epochs = int(PRESETS["default"]["epochs"])
    summary = summarise(raw, epochs)
    sizes_doc = about["sizes_doc"]
    doc = {
        **{k: summary[k] for k in TARGETS},
        "predict_ratio_vs_peer": summary["predict_ratio_vs_peer"],
        "summary": summary,
        "targets": TARGETS,
        "mode": a.mode,
        "epochs": epochs,
        "command": command,
        "date": stamp["date"],
        "machine": machine,
        "sizes": sizes_doc,
        "hidden": sizes_doc["hidden"],
        "image_size": TrainConfig.image_size,
        "data": about["data"],
        "predict_set": about["predict_set"],
        "raw": raw,
    }
    doc["wall_minutes"] = (time.perf_counter() - started) / 60
    out = Path(a.out)
    write_text_atomic(out / "bench.json", json.dumps(doc, indent=2, default=str))
    write_text_atomic(out / "BENCHMARKS.md", render_markdown(doc))
    log.info("wrote %s and %s", out / "BENCHMARKS.md", out / "bench.json")
    for key in ("extraction_ratio", "train_speedup_vs_naive", "full_run_minutes", "predict_ratio_vs_peer", "peak_rss_gib"):
        log.info("%s: %s", key, summary[key] if summary[key] is not None else f"null ({summary['reasons'][key]})")
    return 1 if any("error" in v for k, v in raw.items() if k != "peer") else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        sys.exit(main())
    except AgeGenderError as e:
        log.error("%s", e)
        sys.exit(2)
