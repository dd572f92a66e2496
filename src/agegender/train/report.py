"""Evaluation report: predictions in, report.json + report.md + PNG figures + the predictions as CSV out."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AgeGenderError
from ..files import atomic_path, write_text_atomic
from ..labels import GENDERS, interval_name
from ..rundir import ReportDir
from . import metrics

# Figures reported by the seed notebook; its positive class was male (one sigmoid over the F/M folders).
SEED_REPORTED: dict[str, float] = {"accuracy": 0.9241, "precision": 0.903, "recall": 0.949, "f1": 0.925}
SEED_POSITIVE_CLASS = "male"
MIN_SLICE_N = 10


def _column(name: str, values: Any, n: int, dtype: type) -> np.ndarray:
    a: np.ndarray = np.asarray(values).astype(dtype)
    if a.shape != (n,):
        raise AgeGenderError(f"predictions: {name} has shape {a.shape}, expected ({n},)")
    return a


@dataclass(kw_only=True)
class Predictions:
    """One row per evaluated face. Unknown ages are NaN, unknown race the empty string.

    A face labelled with an age group ("20-29", "70+") has ``age_low``/``age_high`` (inf: open-ended) and a NaN
    ``age_true``: it is scored as a group, never against the group's midpoint.
    """

    gender_true: np.ndarray  # 0 = female, 1 = male
    p_male: np.ndarray
    paths: list[str]
    age_true: np.ndarray | None = None
    age_pred: np.ndarray | None = None
    race: np.ndarray | None = None
    age_low: np.ndarray | None = None
    age_high: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.gender_true = np.asarray(self.gender_true)
        self.p_male = np.asarray(self.p_male, dtype=np.float64)
        n = self.gender_true.shape[0] if self.gender_true.ndim == 1 else -1
        if n < 1 or not np.isin(self.gender_true, (0, 1)).all():
            raise AgeGenderError("predictions: gender_true must be a non-empty 1-D array of 0/1")
        self.gender_true = self.gender_true.astype(np.int64)
        if self.p_male.shape != (n,) or not np.all((self.p_male >= 0) & (self.p_male <= 1)):
            raise AgeGenderError(f"predictions: p_male must hold {n} probabilities in [0, 1]")
        self.paths = [str(p) for p in self.paths]
        if len(self.paths) != n:
            raise AgeGenderError(f"predictions: {len(self.paths)} paths for {n} faces")
        for name in ("age_true", "age_pred", "age_low", "age_high"):
            if getattr(self, name) is not None:
                setattr(self, name, _column(name, getattr(self, name), n, np.float64))
        if self.race is not None:
            self.race = _column("race", self.race, n, str)

    def save_npz(self, path: str | os.PathLike[str]) -> Path:
        arrays = {k: v for k, v in self.__dict__.items() if v is not None and k != "paths"}
        arrays["paths"] = np.array(self.paths, dtype=str)
        # A file object, because np.savez would append ".npz" to the temp name.
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        return Path(path)

    # The CSV's columns in order; the optional ones only when present. age_low/age_high are a labelled age
    # group's bounds (the truth, as age_true), not an interval the model predicted.
    CSV_COLUMNS = ("path", "gender_true", "p_male", "age_true", "age_pred", "age_low", "age_high", "race")

    def save_csv(self, path: str | os.PathLike[str]) -> Path:
        """One row per face, floats written exactly (``repr``), atomically: what the report was computed from."""
        columns = [c for c in self.CSV_COLUMNS if c == "path" or getattr(self, c) is not None]
        values = [self.paths if c == "path" else getattr(self, c).tolist() for c in columns]
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(zip(*values))
        write_text_atomic(path, text.getvalue())
        return Path(path)

    @classmethod
    def load_csv(cls, path: str | os.PathLike[str]) -> Predictions:
        """A :meth:`save_csv` file back; one line naming the file when it is not one."""
        try:
            with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
                rows = list(csv.reader(f))
        except (OSError, csv.Error) as e:
            raise AgeGenderError(f"{path}: not a readable predictions file ({e})") from None
        header = rows[0] if rows else []
        missing = {"path", "gender_true", "p_male"} - set(header)
        unknown = set(header) - set(cls.CSV_COLUMNS)
        if missing or unknown or any(len(r) != len(header) for r in rows):
            raise AgeGenderError(f"{path}: not a predictions file (columns {header[:10]})")
        columns = dict(zip(header, zip(*rows[1:]))) if len(rows) > 1 else {c: () for c in header}
        try:
            fields: dict[str, Any] = {
                c: np.array([float(v) for v in vs]) for c, vs in columns.items() if c not in ("path", "race", "gender_true")
            }
            fields["gender_true"] = np.array([int(v) for v in columns["gender_true"]], dtype=np.int64)
            if "race" in columns:
                fields["race"] = np.array(columns["race"], dtype=object)
            return cls(paths=list(columns["path"]), **fields)
        except (AgeGenderError, TypeError, ValueError) as e:
            raise AgeGenderError(f"{path}: {e}") from None

    @classmethod
    def load_npz(cls, path: str | os.PathLike[str]) -> Predictions:
        try:
            with np.load(path, allow_pickle=False) as z:
                fields = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise AgeGenderError(f"{path}: not a readable predictions file ({e})") from None
        missing = {"gender_true", "p_male", "paths"} - fields.keys()
        if missing:
            raise AgeGenderError(f"{path}: predictions file lacks {', '.join(sorted(missing))}")
        try:
            return cls(**{**fields, "paths": fields["paths"].tolist()})
        except (AgeGenderError, TypeError, ValueError) as e:
            raise AgeGenderError(f"{path}: {e}") from None


def _intervals(pred: Predictions) -> np.ndarray:
    """Faces labelled with an age group."""
    if pred.age_low is None or pred.age_high is None:
        return np.zeros(len(pred.paths), dtype=bool)
    return np.isfinite(pred.age_low)


def _exact_ages(pred: Predictions) -> np.ndarray:
    """Faces labelled with an age in years (not a group)."""
    if pred.age_true is None:
        return np.zeros(len(pred.paths), dtype=bool)
    return np.isfinite(pred.age_true) & ~_intervals(pred)


def _age_slice(pred: Predictions) -> np.ndarray:
    """Adience groups of exact ages; a face labelled with a group keeps its own group's name."""
    labels = np.full(len(pred.paths), "", dtype=object)
    known, groups = _exact_ages(pred), _intervals(pred)
    if known.any():
        labels[known] = [metrics.ADIENCE_GROUP_NAMES[g] for g in metrics.age_groups(pred.age_true[known])]  # type: ignore[index]
    if groups.any():
        labels[groups] = [interval_name(lo, hi) for lo, hi in zip(pred.age_low[groups], pred.age_high[groups])]  # type: ignore[index]
    return labels.astype(str)


def build_report(
    pred: Predictions,
    protocol: dict[str, Any],
    threshold: float = 0.5,
    sources: Sequence[str] | np.ndarray | None = None,
    datasets: Sequence[str] | np.ndarray | None = None,
    seed_comparison: bool | None = None,
) -> dict[str, Any]:
    """All metrics as a JSON-ready dict: protocol, gender, age (when labelled), slices, seed comparison.

    ``sources`` (one per face, e.g. adience / imdb / wiki, "" unknown) adds a per-source slice, and ``datasets``
    (the data set each face came from) a per-data-set slice when there are several. Exact ages are scored by MAE,
    age groups by group accuracy (``age_groups``). The comparison with the seed notebook, whose figures come from
    agegender_cleaned, is added for that data only (``seed_comparison`` None: when ``protocol["kind"]`` says so).
    """
    if not 0 < threshold < 1:
        raise AgeGenderError(f"report: threshold must lie in (0, 1) (got {threshold})")
    y, p = pred.gender_true, pred.p_male
    y_hat = (p >= threshold).astype(np.int64)
    cls = metrics.classification_report(y, y_hat, GENDERS)
    both = y.min() != y.max()
    lo, hi = metrics.bootstrap_ci(y, y_hat)
    bins = metrics.calibration_bins(y, p)
    gender = {
        "n": int(y.size),
        "threshold": threshold,
        "positive_class": GENDERS[1],
        **cls,
        "accuracy_ci95": [lo, hi],
        "auc": metrics.roc_auc(y, p) if both else None,
        "ece": metrics.expected_calibration_error(y, p),
        "calibration": [
            {
                "lower": float(bins["lower"][i]),
                "upper": float(bins["upper"][i]),
                "count": int(bins["count"][i]),
                "mean_predicted": float(bins["mean_predicted"][i]),
                "fraction_male": float(bins["fraction_positive"][i]),
            }
            for i in np.flatnonzero(bins["count"])
        ],
    }
    report: dict[str, Any] = {"protocol": dict(protocol), "gender": gender}

    known, grouped = _exact_ages(pred), _intervals(pred)
    if pred.age_pred is not None and known.any():
        t, a = pred.age_true[known], pred.age_pred[known]  # type: ignore[index]
        groups = metrics.group_accuracy(t, a)
        report["age"] = {
            "n": int(known.sum()),
            "mae": metrics.mae(t, a),
            "cs5": metrics.cumulative_score(t, a, 5),
            "group_exact": groups["exact"],
            "group_one_off": groups["one_off"],
            "by_band": metrics.age_error_by_band(t, a),
        }
    if pred.age_pred is not None and grouped.any():
        report["age_groups"] = metrics.interval_scores(
            pred.age_low[grouped],  # type: ignore[index]
            pred.age_high[grouped],  # type: ignore[index]
            pred.age_pred[grouped],
        )

    slices = {"age_group": _age_slice(pred)}
    if pred.race is not None:
        slices["race"] = pred.race
    if datasets is not None:
        names = _column("datasets", datasets, len(pred.paths), str)
        if len(set(names.tolist()) - {""}) > 1:
            slices["data set"] = names
    if sources is not None:
        source = _column("sources", sources, len(pred.paths), str)
        if "data set" not in slices or not np.array_equal(source, slices["data set"]):
            slices["source"] = source
    by = metrics.sliced_accuracy(y, y_hat, slices)
    report["slices"] = {
        "by": {k: v for k, v in by.items() if v},
        "min_n": MIN_SLICE_N,
        "worst": metrics.worst_slice(by, cls["accuracy"], MIN_SLICE_N),
    }

    if seed_comparison is None:
        seed_comparison = protocol.get("kind") == "agegender"
    if not seed_comparison:
        return report
    ours = {"accuracy": cls["accuracy"], **{k: cls["per_class"][SEED_POSITIVE_CLASS][k] for k in ("precision", "recall", "f1")}}
    report["seed_comparison"] = {
        "positive_class": SEED_POSITIVE_CLASS,
        "note": "The seed notebook's precision/recall/F1 take male as the positive class (a sigmoid over the F/M "
        "folders), so they sit beside our male-class figures. The seed measured on its own split; "
        "read both against the protocol above.",
        "rows": [
            {"metric": k, "seed": SEED_REPORTED[k], "ours": ours[k], "difference": ours[k] - SEED_REPORTED[k]}
            for k in SEED_REPORTED
        ],
    }
    return report


def _jsonable(x: Any) -> Any:
    """Plain Python types with NaN/inf as null, so the file is strict JSON."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    return x


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _value(v: Any, limit: int = 10) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_value(w, limit)}" for k, w in v.items()) or "none"
    if isinstance(v, (list, tuple)):
        shown = ", ".join(str(w) for w in v[:limit])
        return f"{shown}, ... ({len(v)} in all)" if len(v) > limit else shown or "none"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(c) for c in r) + " |" for r in rows),
        "",
    ]


def render_markdown(report: dict[str, Any], figures: Sequence[str] = ()) -> str:
    g = report["gender"]
    labels = g["labels"]
    lines = ["# Evaluation report", "", "## Protocol", ""]
    protocol = dict(report["protocol"])
    if "leakage" in protocol:  # the sentence states the count and its limits
        protocol.pop("leaked_identities", None)
    lines += [f"- **{k}**: {_value(v)}" for k, v in protocol.items()] or ["- (not given)"]

    lo, hi = g["accuracy_ci95"]
    lines += [
        "",
        "## Headline",
        "",
        f"- Gender accuracy **{_f(g['accuracy'])}** (95% bootstrap CI {_f(lo)}-{_f(hi)}) on {g['n']} faces "
        f"at threshold {g['threshold']}; AUC {_f(g['auc'])}; ECE {_f(g['ece'])}.",
    ]
    if "age" in report:
        a = report["age"]
        lines.append(
            f"- Age MAE **{a['mae']:.2f}** years, CS@5 {_f(a['cs5'])}, Adience group exact "
            f"{_f(a['group_exact'])} / one-off {_f(a['group_one_off'])} ({a['n']} faces with age)."
        )
    if "age_groups" in report:
        a = report["age_groups"]
        lines.append(
            f"- Age group (labels are groups, so no MAE): predicted age inside the labelled group "
            f"**{_f(a['exact'])}**, within one group {_f(a['one_off'])}, {a['years_outside']:.2f} years "
            f"outside it on average ({a['n']} faces)."
        )

    rows = [[c, _f(m["precision"]), _f(m["recall"]), _f(m["f1"]), m["support"]] for c, m in g["per_class"].items()]
    rows += [
        [name, _f(g[key]["precision"]), _f(g[key]["recall"]), _f(g[key]["f1"]), g[key]["support"]]
        for name, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg"))
    ]
    lines += ["", "## Gender", "", *markdown_table(["class", "precision", "recall", "F1", "support"], rows)]
    lines += [
        "Confusion matrix (rows true, columns predicted):",
        "",
        *markdown_table(["true \\ predicted", *labels], [[c, *r] for c, r in zip(labels, g["confusion_matrix"])]),
    ]

    if "age" in report:
        a = report["age"]
        lines += [
            "## Age",
            "",
            *markdown_table(
                ["metric", "value"],
                [
                    ["faces with age", a["n"]],
                    ["MAE (years)", f"{a['mae']:.2f}"],
                    ["CS@5", _f(a["cs5"])],
                    ["Adience group exact", _f(a["group_exact"])],
                    ["Adience group one-off", _f(a["group_one_off"])],
                ],
            ),
        ]
        if a.get("by_band"):  # reports written before the bands lack them
            lines += [
                "By true age (mean error: negative is too young):",
                "",
                *markdown_table(
                    ["true age", "faces", "MAE", "mean error"],
                    [[k, v["n"], f"{v['mae']:.2f}", f"{v['mean_error']:+.2f}"] for k, v in a["by_band"].items()],
                ),
            ]

    if "age_groups" in report:
        a = report["age_groups"]
        lines += [
            "## Age groups",
            "",
            "These faces are labelled with an age group, not an age: a prediction counts when it lies in the "
            "group (\"20-29\" holds 20.0 to 29.99). A group's midpoint is not the person's age, so no MAE "
            "is given for them.",
            "",
            *markdown_table(
                ["metric", "value"],
                [
                    ["faces with an age group", a["n"]],
                    ["inside the labelled group", _f(a["exact"])],
                    ["within one group", _f(a["one_off"])],
                    ["years outside the group (mean)", f"{a['years_outside']:.2f}"],
                ],
            ),
            *markdown_table(
                ["labelled group", "n", "inside", "mean predicted age"],
                [[k, v["n"], _f(v["exact"]), f"{v['mean_predicted']:.1f}"] for k, v in a["per_group"].items()],
            ),
        ]

    s = report["slices"]
    lines += ["## Slices", "", f"Gender accuracy per group (overall {_f(g['accuracy'])}).", ""]
    for name, groups in s["by"].items():
        lines += [
            f"### {name}",
            "",
            *markdown_table([name, "n", "accuracy"], [[v, d["n"], _f(d["accuracy"])] for v, d in groups.items()]),
        ]
    w = s["worst"]
    lines.append(
        f"Worst group: **{w['slice']} = {w['value']}** (n={w['n']}), accuracy {_f(w['accuracy'])}, {_f(w['gap'])} below overall."
        if w
        else f"Worst group: none has at least {s['min_n']} faces."
    )

    if figures:
        lines += ["", "## Figures", "", *(f"![{Path(f).stem}]({f})" for f in figures)]

    if "seed_comparison" not in report:
        return "\n".join(lines)
    c = report["seed_comparison"]
    lines += [
        "",
        "## Comparison with the seed notebook",
        "",
        c["note"],
        "",
        *markdown_table(
            ["metric", "seed", "ours", "ours - seed"],
            [
                [
                    r["metric"] + (f" ({c['positive_class']})" if r["metric"] != "accuracy" else ""),
                    _f(r["seed"]),
                    _f(r["ours"]),
                    f"{r['difference']:+.4f}",
                ]
                for r in c["rows"]
            ],
        ),
    ]
    return "\n".join(lines)


def _figure(ncols: int = 1, width: float = 5.0) -> Any:
    # An explicit Agg canvas: no pyplot, so no global backend switch and no GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _plot_confusion(cm: np.ndarray, labels: Sequence[str], path: Path) -> None:
    fig = _figure(width=4.5)
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set(
        xticks=range(len(labels)),
        yticks=range(len(labels)),
        xticklabels=labels,
        yticklabels=labels,
        xlabel="predicted",
        ylabel="true",
        title="Gender confusion matrix",
    )
    _save(fig, path)


def _plot_roc(y: np.ndarray, p: np.ndarray, auc: float, path: Path) -> None:
    fpr, tpr, _ = metrics.roc_curve(y, p)
    fig = _figure(width=4.5)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, label=f"AUC {auc:.4f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="false positive rate (female called male)", ylabel="true positive rate (male)", title="ROC")
    ax.legend(loc="lower right")
    _save(fig, path)


def _plot_calibration(y: np.ndarray, p: np.ndarray, ece: float, path: Path) -> None:
    b = metrics.calibration_bins(y, p)
    used = b["count"] > 0
    fig = _figure(width=4.5)
    ax = fig.add_subplot()
    ax.bar(
        b["lower"][used],
        b["fraction_positive"][used],
        width=b["upper"][0] - b["lower"][0],
        align="edge",
        edgecolor="black",
        alpha=0.7,
        label="fraction male",
    )
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    ax.plot(b["mean_predicted"][used], b["fraction_positive"][used], "o", color="black", ms=3)
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="predicted P(male)",
        ylabel="observed fraction male",
        title=f"Reliability (ECE {ece:.4f})",
    )
    ax.legend(loc="upper left")
    _save(fig, path)


def _plot_age(t: np.ndarray, a: np.ndarray, path: Path) -> None:
    fig = _figure(width=4.5)
    ax = fig.add_subplot()
    ax.scatter(t, a, s=4, alpha=0.3)
    top = float(max(t.max(), a.max(), 1.0))
    ax.plot([0, top], [0, top], ls="--", color="grey")
    ax.set(xlabel="true age", ylabel="predicted age", title=f"Age (MAE {metrics.mae(t, a):.2f})")
    _save(fig, path)


def _plot_age_groups(low: np.ndarray, high: np.ndarray, a: np.ndarray, path: Path) -> None:
    """Predicted ages per labelled group, each group's interval shaded: there is no true age to plot against."""
    groups = sorted(set(zip(low.tolist(), high.tolist())))
    fig = _figure(width=max(4.5, 0.6 * len(groups)))
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    # An open-ended group ("70+") is shaded up to the oldest prediction, and at least 20 years.
    top = float(max(np.nanmax(a), max(lo + 20 for lo, _ in groups), 1.0))
    for i, (lo, hi) in enumerate(groups):
        mine = (low == lo) & (high == hi)
        ax.add_patch(_rectangle(i - 0.4, lo, 0.8, (top if hi == np.inf else hi + 1) - lo))
        ax.scatter(i + rng.uniform(-0.3, 0.3, int(mine.sum())), a[mine], s=4, alpha=0.4, color="C0")
    ax.set(
        xticks=range(len(groups)),
        xticklabels=[interval_name(lo, hi) for lo, hi in groups],
        xlabel="labelled age group",
        ylabel="predicted age",
        xlim=(-0.6, len(groups) - 0.4),
        title="Predicted age per labelled group (shaded: the group)",
    )
    _save(fig, path)


def _rectangle(x: float, y: float, w: float, h: float) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, color="grey", alpha=0.25, lw=0)


def _loss_panels(keys: Sequence[str]) -> list[tuple[str, list[str]]]:
    """One panel per loss, its train and validation curves together: "train_gender_loss" and "val_gender_loss"
    share the "gender loss" panel. A total ("train_loss": gender + age) and a part ("val_loss": gender only)
    never share an axis, where their gap would read as overfitting."""
    panels: dict[str, list[str]] = {}
    for k in keys:
        if "loss" not in k:
            continue
        kind = k.removeprefix("train_").removeprefix("val_").removesuffix("loss").strip("_").replace("_", " ")
        panels.setdefault(f"{kind} loss" if kind else k, []).append(k)
    if len(panels) > 2:  # the parts are there: the totals add nothing a reader can compare
        panels.pop("train_loss", None)
        panels.pop("val_loss", None)
    titles = {"train_loss": "train loss (gender + age)", "val_loss": "validation loss (gender)"}
    order = sorted(panels, key=lambda t: not t.startswith("gender"))  # gender first, as the headline
    return [(titles.get(t, t), panels[t]) for t in order]


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Panels from per-epoch dicts: one per loss (train and validation of the same loss together), accuracy and
    age MAE (keys like train_gender_loss, val_gender_loss, val_accuracy, val_age_mae)."""
    if not history or not all(isinstance(h, dict) for h in history):
        raise AgeGenderError(f"{path}: training history must be a non-empty list of per-epoch dicts")
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    keys = sorted({k for h in history for k, v in h.items() if k != "epoch" and isinstance(v, (int, float))})
    panels = _loss_panels(keys) + [
        (title, [k for k in keys if test(k)])
        for title, test in (("gender accuracy", lambda k: "acc" in k), ("age MAE (years)", lambda k: "mae" in k))
    ]
    panels = [(t, ks) for t, ks in panels if ks]
    if not panels:
        raise AgeGenderError(f"{path}: training history has no loss, accuracy or MAE values")
    fig = _figure(ncols=len(panels), width=4.0)
    for ax, (title, ks) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for k in ks:
            pts = [(e, h[k]) for e, h in zip(epochs, history) if isinstance(h.get(k), (int, float))]
            ax.plot(*zip(*pts), marker="o", ms=3, label=k)
        ax.set(xlabel="epoch", title=title)
        ax.legend()
    _save(fig, Path(path))
    return Path(path)


def write_report(
    report: dict[str, Any],
    pred: Predictions,
    out_dir: ReportDir | str | os.PathLike[str],
    history: list[dict[str, Any]] | None = None,
) -> Path:
    """Write the per-face predictions, report.json, the figures and report.md (which links them) into
    ``out_dir`` (its files: :class:`~agegender.rundir.ReportDir`); return report.md's path."""
    folder = out_dir if isinstance(out_dir, ReportDir) else ReportDir(Path(out_dir))
    out = folder.path
    g = report["gender"]
    y, p = pred.gender_true, pred.p_male
    figures = ["confusion_matrix.png"]
    _plot_confusion(np.asarray(g["confusion_matrix"]), g["labels"], out / "confusion_matrix.png")
    if g["auc"] is not None:
        _plot_roc(y, p, g["auc"], out / "roc.png")
        figures.append("roc.png")
    _plot_calibration(y, p, g["ece"], out / "calibration.png")
    figures.append("calibration.png")
    if "age" in report and pred.age_true is not None and pred.age_pred is not None:
        known = _exact_ages(pred)
        _plot_age(pred.age_true[known], pred.age_pred[known], out / "age_scatter.png")
        figures.append("age_scatter.png")
    if "age_groups" in report and pred.age_pred is not None:
        grouped = _intervals(pred)
        _plot_age_groups(
            pred.age_low[grouped],  # type: ignore[index]
            pred.age_high[grouped],  # type: ignore[index]
            pred.age_pred[grouped],
            out / "age_groups.png",
        )
        figures.append("age_groups.png")
    if history:
        plot_training_curves(history, out / "training_curves.png")
        figures.append("training_curves.png")

    pred.save_csv(folder.predictions)
    write_text_atomic(folder.json, json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    write_text_atomic(folder.md, render_markdown(report, figures) + "\n")  # last: a report.md means all is there
    return folder.md
