"""Figures the notebooks show: frame grids, boxes over frames, tables, sliders with a static fallback.

Plotting only: every function takes arrays or tensors already computed by the
other modules and draws them; nothing here computes what it shows. Imports stay
inside the functions, so `import cnx.viz` pulls in neither matplotlib nor
ipywidgets. Figures come from `plt.subplots`: a notebook cell ending in
`fig = viz.some_figure(...)` shows the figure once.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# Dataset and loss figures (notebooks 01 and 03)


def _numpy(values):
    """A numpy array of a tensor (any device or dtype) or of anything array-like."""
    import numpy as np

    if hasattr(values, "detach"):
        values = values.detach().cpu()
        values = values.float() if values.dtype.is_floating_point else values
        values = values.numpy()
    return np.asarray(values)


def as_rgb(image, value_range=(-1.0, 1.0)):
    """(H, W, 3) floats in [0, 1] from a (3, H, W) or (H, W, 3) image whose values span `value_range`.

    Channels come first when the first axis has 3 entries; uint8 images are read as 0..255.
    """
    import numpy as np

    array = _numpy(image)
    if array.ndim == 3 and array.shape[0] == 3:
        array = array.transpose(1, 2, 0)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    low, high = value_range
    return np.clip((array.astype(np.float32) - low) / (high - low), 0.0, 1.0)


def _clean_axes(axes):
    for ax in getattr(axes, "flat", axes):
        ax.set_xticks([])
        ax.set_yticks([])


def draw_box(ax, box, width, height, **style):
    """Draw a normalised box, (x0, y0, x1, y1) or [[x0, y0], [x1, y1]], on a width x height image.

    Returns the Rectangle patch; `style` goes to it (default: unfilled, white edge).
    """
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in _numpy(box).ravel())
    style = {"fill": False, "ec": "white", "lw": 1.0} | style
    return ax.add_patch(Rectangle((x0 * width, y0 * height), (x1 - x0) * width, (y1 - y0) * height, **style))


def draw_boxes(ax, frame_detections, width, height, threshold=None):
    """One frame's detections over its image: person boxes white, confident hands lime, the other hands red.

    A hand is confident when its mean keypoint score exceeds `threshold`
    (default: `cnx.meta.HAND_THRESHOLD`, the hand weights' rule). One patch per box; returns them.
    """
    from cnx.meta import HAND_THRESHOLD

    threshold = HAND_THRESHOLD if threshold is None else threshold
    patches = [draw_box(ax, box, width, height) for box in frame_detections.boxes]
    for box, confidence in zip(frame_detections.hands_boxes, frame_detections.hands_confidence, strict=True):
        colour = "lime" if confidence > threshold else "red"
        patches.append(draw_box(ax, box, width, height, ec=colour, lw=1.5))
    return patches


def frame_pair(video_frame, pose_frame, frame_detections=None, title="frame"):
    """One RGB frame (H, W, 3) with its detection boxes next to its pose frame; for a frame slider."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6, 4.2))
    axes[0].imshow(_numpy(video_frame))
    if frame_detections is not None:
        height, width = video_frame.shape[:2]
        draw_boxes(axes[0], frame_detections, width, height)
    axes[1].imshow(_numpy(pose_frame))
    axes[0].set_title(f"RGB {title}")
    axes[1].set_title(f"pose {title}")
    for ax in axes:
        ax.axis("off")
    return fig


def frame_strip(video_frames, pose_frames, detections, indices):
    """RGB frames with their boxes (top row) over their pose frames (bottom row), at `indices`.

    video_frames (T, H, W, 3) and pose_frames (T, H', W', 3) uint8; detections: one per frame.
    """
    import matplotlib.pyplot as plt

    height, width = video_frames.shape[1:3]
    fig, axes = plt.subplots(2, len(indices), figsize=(2 * len(indices), 5.2), squeeze=False)
    for col, t in enumerate(indices):
        axes[0, col].imshow(_numpy(video_frames[t]))
        draw_boxes(axes[0, col], detections[t], width, height)
        axes[1, col].imshow(_numpy(pose_frames[t]))
        axes[0, col].set_title(f"frame {t}")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def detection_panels(frame, pose_frame, frame_detections, overlay=None, title=None):
    """What a detector made of one frame: the frame, its drawn pose, and its boxes (see `draw_boxes`).

    frame (H, W, 3) uint8; pose_frame the pose image drawn for it; frame_detections a
    `cnx.meta.FrameDetections`, drawn on the third panel over `overlay` when given (e.g. the frame
    with the pose laid on it by `cnx.overlay.overlay_pose`), else over the frame.
    """
    import matplotlib.pyplot as plt

    frame = _numpy(frame)
    boxed = frame if overlay is None else _numpy(overlay)
    if boxed.shape != frame.shape:
        raise ValueError(f"the overlay {boxed.shape} and the frame {frame.shape} differ in shape")
    height, width = frame.shape[:2]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4 * height / width + 0.6))
    axes[0].imshow(frame)
    axes[1].imshow(_numpy(pose_frame))
    axes[2].imshow(boxed)
    draw_boxes(axes[2], frame_detections, width, height)
    axes[0].set_title("frame", fontsize=9)
    axes[1].set_title("pose drawn", fontsize=9)
    axes[2].set_title(("pose over the frame, " if overlay is not None else "") + "boxes", fontsize=9)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def clip_timeline(clips, labels, num_frames):
    """One row per `cnx.data.ClipIndices`: the frames it reads in a video of `num_frames` frames.

    Dots: clip frames; hollow dot: clip frame 0, which the reference (star) replaces.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 0.5 + 0.35 * len(clips)))
    for row, clip in enumerate(clips):
        ax.scatter(clip.clip_indices[1:], [row] * (len(clip.clip_indices) - 1), s=25, color="tab:blue")
        ax.scatter(clip.clip_indices[:1], [row], s=40, facecolors="none", edgecolors="tab:blue")
        ax.scatter([clip.reference_index], [row], marker="*", s=150, color="tab:orange")
    ax.set_yticks(range(len(clips)), labels)
    ax.set_xlim(-1, num_frames)
    ax.set_xlabel(f"frame index in a {num_frames}-frame video")
    ax.set_title("dots: frames used; hollow: clip frame 0 (replaced); star: the reference frame")
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def hand_overlay(ax, rgb, weights, vmax=None, alpha=0.7):
    """`rgb` (H, W, 3) in [0, 1] with the hand weights (H, W) over it; pixels of weight <= 1 left clear.

    Returns the weights' image, for a colourbar (scale 1..vmax, default `cnx.data.HAND_WEIGHT`).
    """
    import numpy as np

    from cnx.data import HAND_WEIGHT

    weights = _numpy(weights).astype(np.float32)
    ax.imshow(rgb)
    hands_only = np.ma.masked_where(weights <= 1, weights)
    return ax.imshow(
        hands_only, cmap="magma", alpha=alpha, vmin=1, vmax=HAND_WEIGHT if vmax is None else vmax
    )


def sample_grid(sample, rows=("pixel_values", "pose_frames", "hand_weights"), title=None):
    """A `ClipDataset` sample as a grid: one row per key in `rows`, one column per frame.

    pixel_values are drawn from [-1, 1], pose_frames from [0, 1]; hand_weights are
    laid over the RGB frames (weight 1 left clear) with a colourbar as the grid's last axes.
    """
    import matplotlib.pyplot as plt

    num_frames = sample["pixel_values"].shape[0]
    fig, axes = plt.subplots(
        len(rows), num_frames, figsize=(1.5 * num_frames + 0.8, 2.4 * len(rows)), squeeze=False
    )
    weights_image = None
    for t in range(num_frames):
        rgb = as_rgb(sample["pixel_values"][t])
        for r, key in enumerate(rows):
            ax = axes[r, t]
            if key == "pixel_values":
                ax.imshow(rgb)
            elif key == "pose_frames":
                ax.imshow(as_rgb(sample["pose_frames"][t], (0.0, 1.0)))
            elif key == "hand_weights":
                weights_image = hand_overlay(ax, rgb, sample["hand_weights"][t, 0])
            else:
                raise ValueError(f"cannot draw {key!r}; rows may be pixel_values, pose_frames, hand_weights")
        frame = int(sample["frame_indices"][t]) if "frame_indices" in sample else t
        axes[0, t].set_title(("ref " if t == 0 else "") + f"#{frame}", fontsize=9)
    _clean_axes(axes)
    for r, key in enumerate(rows):
        axes[r, 0].set_ylabel(key, fontsize=9)
    if weights_image is not None:  # a colourbar beside the hand_weights row; every row keeps its width
        row = list(rows).index("hand_weights")
        height = 1 - row / (len(rows) - 1) if len(rows) > 1 else 0.5
        fig.colorbar(
            weights_image,
            ax=axes.ravel().tolist(),
            fraction=0.02,
            shrink=0.9 / len(rows),
            anchor=(0.0, height),
            label="weight",
        )
    if title:
        fig.suptitle(title)
    return fig


def image_row(images, size=2.0):
    """Images side by side, {title: (H, W, 3) in [0, 1] or uint8}; see `as_rgb` for tensors."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(size * len(images), 1.5 * size), squeeze=False)
    for ax, (title, image) in zip(axes[0], images.items(), strict=True):
        ax.imshow(_numpy(image))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return fig


def crop_windows(frame, windows, crops):
    """Per output size: the frame with candidate crop windows, then the centred crop as the model gets it.

    frame (H, W, 3) uint8; windows {name: [CropBox, ...]} (the middle one, the centred
    window for offsets spread evenly over [0, 1], drawn in yellow); crops {name: (3, h, w) uint8}.
    """
    import matplotlib.pyplot as plt

    height, width = frame.shape[:2]
    fig, axes = plt.subplots(1, 2 * len(windows), figsize=(2.8 * len(windows) * 2, 4), squeeze=False)
    for i, (name, boxes) in enumerate(windows.items()):
        ax = axes[0, 2 * i]
        ax.imshow(_numpy(frame))
        for j, box in enumerate(boxes):
            centred = j == len(boxes) // 2
            style = {"ec": "yellow", "lw": 2.5} if centred else {"ec": "cyan", "lw": 1, "ls": "--"}
            draw_box(ax, box, width, height, **style)
        ax.set_title(f"{name}: windows (centred in yellow)", fontsize=9)
        crop = crops[name]
        axes[0, 2 * i + 1].imshow(as_rgb(crop))
        axes[0, 2 * i + 1].set_title(f"centred crop at {crop.shape[-1]}x{crop.shape[-2]}", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def score_histogram(confidences, threshold):
    """Histogram of hand confidences (mean keypoint scores) with the threshold and the share above it."""
    import matplotlib.pyplot as plt
    import numpy as np

    confidences = _numpy(confidences)
    above = float(np.mean(confidences > threshold))
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(confidences, bins=40, color="tab:gray")
    ax.axvline(threshold, color="tab:red", label=f"threshold {threshold}: {above:.0%} of hands above")
    ax.set_xlabel("hand confidence (mean keypoint score)")
    ax.set_ylabel("hands")
    ax.legend()
    return fig


def hand_weight_figure(rgb, weights, pooled=None, boxes=(), title="weights over the frame", frame=True):
    """[The frame;] the frame with its hand weights (weight 1 left clear) and `boxes`; [the weights pooled].

    rgb (H, W, 3) in [0, 1]; weights (H, W); pooled: optional (h, w) latent-size weights;
    boxes: (normalised box, colour) pairs to outline; `frame`: show the bare frame first.
    One colourbar, the last axes.
    """
    import matplotlib.pyplot as plt

    weights = _numpy(weights)
    vmax = max(float(weights.max()), 1.0 + 1e-6)
    panels = 1 + bool(frame) + (pooled is not None)
    fig, axes = plt.subplots(1, panels, figsize=(3 * panels + 0.8, 4), squeeze=False)
    axes = list(axes[0])
    if frame:
        axes[0].imshow(rgb)
        axes[0].set_title("frame", fontsize=10)
    overlay_ax = axes[int(bool(frame))]
    image = hand_overlay(overlay_ax, rgb, weights, vmax=vmax)
    for box, colour in boxes:
        draw_box(overlay_ax, box, weights.shape[1], weights.shape[0], ec=colour, lw=1.5, ls="--")
    overlay_ax.set_title(title, fontsize=10)
    if pooled is not None:
        image = axes[-1].imshow(_numpy(pooled), cmap="magma", vmin=1, vmax=vmax)
        axes[-1].set_title(f"pooled to latent size {tuple(pooled.shape[-2:])}", fontsize=10)
    _clean_axes(axes)
    fig.colorbar(image, ax=list(axes), fraction=0.03, label="loss weight")
    return fig


def noise_panels(rows, sigmas, correlations=None):
    """Noised signals, one row per {name: (S, C, H, W)} and one column per sigma in `sigmas` (S,).

    3-channel rows are shown as RGB with values in [-1, 1]; other rows show
    channel 0 on a fixed [-2.5, 2.5] scale. `correlations` {name: (S,)} labels each panel.
    """
    import matplotlib.pyplot as plt

    sigmas = _numpy(sigmas).reshape(-1)
    fig, axes = plt.subplots(
        len(rows), len(sigmas), figsize=(1.9 * len(sigmas) + 0.5, 2.9 * len(rows)), squeeze=False
    )
    for r, (name, images) in enumerate(rows.items()):
        images = _numpy(images)
        for col, sigma in enumerate(sigmas):
            ax = axes[r, col]
            if images.shape[1] == 3:
                ax.imshow(as_rgb(images[col]))
            else:
                ax.imshow(images[col, 0], cmap="RdBu_r", vmin=-2.5, vmax=2.5)
            ax.set_title(f"sigma = {sigma:g}", fontsize=9)
            if correlations is not None:
                ax.set_xlabel(f"corr {float(correlations[name][col]):.2f}", fontsize=9)
        axes[r, 0].set_ylabel(name, fontsize=9)
    _clean_axes(axes)
    fig.tight_layout()
    return fig


def share_bars(observed, stated, title=""):
    """Grouped bars of observed against stated shares, {case: share} each, the observed ones labelled."""
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(observed)
    positions = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(10, 3.4))
    bars = ax.bar(positions - 0.2, [observed[k] for k in names], width=0.4, label="observed")
    ax.bar(positions + 0.2, [stated[k] for k in names], width=0.4, label="stated")
    ax.bar_label(bars, fmt="%.3f")
    ax.set_xticks(positions, names)
    ax.set_ylim(0, 1.1 * max(max(observed.values()), max(stated.values())))
    ax.set(ylabel="share of samples", title=title)
    ax.legend()
    return fig


class Table:
    """A small table: rows of {column: value}; HTML in a notebook, aligned text in `print`."""

    def __init__(self, rows):
        self.rows = [dict(row) for row in rows]
        self.columns = list(dict.fromkeys(key for row in self.rows for key in row))

    @staticmethod
    def _cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    def cells(self) -> list[list[str]]:
        return [[self._cell(row.get(c, "")) for c in self.columns] for row in self.rows]

    def __str__(self) -> str:
        cells = [self.columns, *self.cells()]
        widths = [max(len(line[i]) for line in cells) for i in range(len(self.columns))]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
        )

    __repr__ = __str__

    def _repr_html_(self) -> str:
        from html import escape

        head = "".join(f"<th>{escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in line) + "</tr>" for line in self.cells()
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def table(rows):
    """A `Table` of rows {column: value}: the last line of a cell shows it."""
    return Table(rows)


def describe(mapping):
    """A `Table` of a dict such as a dataset sample: shape, dtype and range of tensors, other values as is."""
    rows = []
    for key, value in mapping.items():
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            array = _numpy(value)
            rows.append(
                {
                    "key": key,
                    "shape or value": tuple(value.shape),
                    "dtype": str(value.dtype).removeprefix("torch."),
                    "min": array.min().item() if array.size else "",
                    "max": array.max().item() if array.size else "",
                }
            )
        else:
            rows.append({"key": key, "shape or value": value})
    return Table(rows)


def slider_view(draw, static=None, **sliders):
    """ipywidgets sliders over `draw(**values) -> Figure`, then a static figure the saved notebook keeps.

    The sliders redraw `draw`'s figure in a live notebook (an executed notebook
    stores no widget pictures). `static()` draws the fallback figure shown below
    them; by default `draw` at the sliders' starting values. Returns that figure.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    def update(**values):
        fig = draw(**values)
        display(fig)
        plt.close(fig)

    display(widgets.interactive(update, **sliders))
    if static is None:
        return draw(**{name: slider.value for name, slider in sliders.items()})
    return static()


# ---------------------------------------------------------------------------------------------
# Model figures (notebook 02)

UNET_COLOR, CONTROL_COLOR, HIDDEN_COLOR = "#cfe2f3", "#e69138", "#3d85c6"


def _float_array(values):
    """A float64 numpy copy of a tensor (any device or dtype) or array."""
    return _numpy(values).astype("float64")


def controlnext_diagram():
    """Block diagram of ControlNeXt-SVD: the pose branch, cross-normalised, added after down_blocks[0]."""
    import matplotlib.pyplot as plt

    def box(ax, x, y, text, color, w=1.7, h=0.62):
        ax.add_patch(plt.Rectangle((x - w / 2, y - h / 2), w, h, fc=color, ec="black", lw=1))
        ax.text(x, y, text, ha="center", va="center", fontsize=8.5)

    def arrow(ax, start, end, color="black", ls="-"):
        ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color=color, lw=1.3, ls=ls))

    fig, ax = plt.subplots(figsize=(12, 4.6))
    control_box = "#fce5cd"
    row = [
        (0.9, "latents\n(B, F, 8, h, w)"),
        (3.0, "conv_in"),
        (5.1, "down_blocks[0]"),
        (8.6, "down_blocks[1]"),
        (10.6, "mid_block"),
        (12.6, "up_blocks\n-> v-prediction"),
    ]
    for x, text in row:
        box(ax, x, 3.0, text, UNET_COLOR)
    plus = (6.85, 3.0)
    ax.add_patch(plt.Circle(plus, 0.22, fc="white", ec="black"))
    ax.text(*plus, "+", ha="center", va="center", fontsize=14)
    for (x0, _), (x1, _) in [*zip(row[:2], row[1:3], strict=True), *zip(row[3:5], row[4:], strict=True)]:
        arrow(ax, (x0 + 0.85, 3.0), (x1 - 0.85, 3.0))
    arrow(ax, (5.95, 3.0), (plus[0] - 0.22, 3.0))
    arrow(ax, (plus[0] + 0.22, 3.0), (7.75, 3.0))
    # The skip states of down_blocks[0] go to the up blocks unchanged.
    ax.annotate(
        "",
        xy=(12.6, 3.31),
        xytext=(5.1, 3.31),
        arrowprops=dict(arrowstyle="-|>", color="grey", lw=1.2, ls="--", connectionstyle="arc3,rad=-0.25"),
    )
    ax.text(8.8, 4.35, "skip states of down_blocks[0]: untouched", color="grey", ha="center", fontsize=9)
    # The ControlNeXt branch.
    branch = [
        (0.9, "pose_frames\n(B, F, 3, H, W)"),
        (3.0, "ControlNeXt\n(+ c_noise)"),
        (5.1, "cross-normalise\nto h, avg-pool"),
        (6.85, "x scale"),
    ]
    for x, text in branch:
        box(ax, x, 1.1, text, control_box, w=1.7 if x < 6 else 1.1)
    for (x0, _), (x1, _) in zip(branch[:-1], branch[1:], strict=True):
        arrow(ax, (x0 + 0.85, 1.1), (x1 - (0.85 if x1 < 6 else 0.55), 1.1))
    arrow(ax, (6.85, 1.41), (plus[0], plus[1] - 0.22), color="#b45f06")
    arrow(ax, (5.1, 2.69), (5.1, 1.41), color="grey", ls=":")
    ax.text(5.2, 2.0, "mean, std of h", color="grey", fontsize=8)
    ax.text(3.0, 0.45, "(B*F, C, H/8, W/8)", ha="center", fontsize=8, color="#b45f06")
    ax.set_xlim(-0.1, 13.6)
    ax.set_ylim(0.2, 4.6)
    ax.axis("off")
    ax.set_title("ControlNeXt-SVD: one addition after the UNet's first down block")
    return fig


def pose_frames_figure(source, resized, frames=None):
    """Pose frames as drawn (top row) and as the model gets them after crop + resize (bottom row).

    source: (F, Hs, Ws, 3) uint8; resized: (F, H, W, 3) uint8; `frames` picks the columns
    (default: up to 6 spread over the clip). The bottom row shows whole pixels (no smoothing).
    """
    import matplotlib.pyplot as plt
    import numpy as np

    source, resized = np.asarray(source), np.asarray(resized)
    if frames is None:
        frames = np.unique(np.linspace(0, len(source) - 1, min(6, len(source))).astype(int))
    fig, axes = plt.subplots(2, len(frames), figsize=(1.6 * len(frames), 5.2), squeeze=False)
    for col, t in enumerate(frames):
        axes[0, col].imshow(source[t])
        axes[1, col].imshow(resized[t], interpolation="nearest")
        axes[0, col].set_title(f"frame {t}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel(f"drawn at {source.shape[2]}x{source.shape[1]}", fontsize=9)
    axes[1, 0].set_ylabel(f"model input {resized.shape[2]}x{resized.shape[1]}", fontsize=9)
    fig.tight_layout()
    return fig


def parameter_bars(counts):
    """Horizontal bars of parameter counts {name: count} on a log scale, each labelled in millions."""
    import matplotlib.pyplot as plt

    names = list(counts)
    values = [counts[n] for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.45 + 0.7 * len(names)))
    colors = [CONTROL_COLOR, "#6fa8dc", HIDDEN_COLOR, "#a4c2f4", "#f6b26b"]
    ax.barh(names, values, color=[colors[i % len(colors)] for i in range(len(names))])
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    for y, n in enumerate(values):
        ax.text(n * 1.1, y, f"{n / 1e6:,.1f} M", va="center", fontsize=9)
    ax.set_xlim(min(values) / 3, max(values) * 10)
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def cross_norm_histograms(hidden, raw, matched, raw_label="ControlNeXt features, added as they are"):
    """What each way of adding a control puts on top of the UNet's hidden states h, on shared axes.

    Columns: `raw` features added as they are, ControlNet's zero convolution at
    its first step (adds exactly 0), the cross-normalised `matched` features; h's
    histogram (blue) is in every panel. Top row: the whole range, log density;
    bottom row: the same, zoomed to h's mean +- 4 std, linear density. All panels
    of a row share their axes.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    hidden, raw, matched = (_float_array(v).ravel() for v in (hidden, raw, matched))
    mean_h, std_h = hidden.mean(), hidden.std()
    zoom = (mean_h - 4 * std_h, mean_h + 4 * std_h)
    fig, axes = plt.subplots(2, 3, figsize=(13, 5.6), sharey="row")
    for row in axes:
        for ax in row[1:]:
            ax.sharex(row[0])

    def hist(ax, values, color, label, bins):
        density, edges = np.histogram(values, bins=bins, density=True)
        ax.stairs(density, edges, fill=True, alpha=0.55, color=color, label=label)

    series = [(raw, raw_label), (None, "ControlNet zero conv: all 0"), (matched, "cross-normalised features")]
    for col, (values, label) in enumerate(series):
        for row, bins in ((0, 80), (1, np.linspace(*zoom, 61))):
            ax = axes[row, col]
            hist(ax, hidden, HIDDEN_COLOR, f"UNet hidden states h (std {std_h:.2g})", bins)
            if values is None:
                ax.axvline(0.0, color=CONTROL_COLOR, lw=2.5, label=label)
            elif row == 0:
                hist(ax, values, CONTROL_COLOR, label, bins)
            else:  # only what falls inside the zoom, still as a share of all values
                inside = values[(values >= zoom[0]) & (values <= zoom[1])]
                density, edges = np.histogram(inside, bins=bins)
                widths = np.diff(edges)
                ax.stairs(
                    density / (values.size * widths),
                    edges,
                    fill=True,
                    alpha=0.55,
                    color=CONTROL_COLOR,
                    label=label,
                )
    axes[0, 0].set_title(f"added as is: std {raw.std() / std_h:.0f}x h's", fontsize=10)
    axes[0, 1].set_title("ControlNet, first step: adds exactly 0", fontsize=10)
    axes[0, 2].set_title(f"ControlNeXt: std {matched.std() / std_h:.2f}x h's, same mean", fontsize=10)
    axes[0, 0].set_yscale("log")
    top = np.histogram(hidden, bins=80, density=True)[0].max()
    axes[0, 0].set_ylim(top * 1e-4, top * 3)
    axes[0, 0].set_ylabel("density (log), whole range")
    axes[1, 0].set_ylabel("density, zoom on h")
    axes[1, 0].set_xlim(*zoom)
    for ax in axes[1]:
        ax.set_xlabel("value")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    for ax in axes[0, 1:]:
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def change_maps(maps, pose=None, vmax=None, label="mean |change| over channels"):
    """Heat maps {title: (h, w)} on ONE colour scale with one colourbar; optional pose image first.

    vmax defaults to the largest value of all maps, so equal colours mean equal
    change in every panel. Returns the figure; its last axes is the colourbar.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    arrays = {title: _float_array(m) for title, m in maps.items()}
    vmax = max(a.max() for a in arrays.values()) if vmax is None else vmax
    panels = len(arrays) + (pose is not None)
    fig, axes = plt.subplots(1, panels, figsize=(2.2 * panels + 0.9, 3.2), squeeze=False)
    axes = list(axes[0])
    if pose is not None:
        axes[0].imshow(np.asarray(pose), interpolation="nearest")
        axes[0].set_title("pose frame", fontsize=9)
    image = None
    for ax, (title, array) in zip(axes[pose is not None :], arrays.items(), strict=True):
        image = ax.imshow(array, cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(str(title), fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(image, ax=axes, label=label, fraction=0.046, pad=0.04)
    return fig


def relative_change_curve(scales, changes, default=None, ax=None):
    """||out(s) - out(0)|| / ||out(0)|| against the control scale s, the default marked."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(scales, changes, "o-", color=CONTROL_COLOR)
    if default is not None:
        ax.axvline(default, color="grey", ls="--", lw=1)
        ax.text(default * 1.1, max(changes) * 0.9, f"default {default}", color="grey", fontsize=8)
    ax.set_xlabel("control_scale")
    ax.set_ylabel("||out(s) - out(0)|| / ||out(0)||")
    return ax.figure


# ---------------------------------------------------------------------------------------------
# A run's logs (cnx launch, notebook 04)


def loss_curve(records, window: int | None = None):
    """The training loss per step of `steps.jsonl` records, its running mean, and the learning rate.

    One step's loss depends strongly on its random sigma: each point is coloured by the step's mean
    sigma (`sigma_mean`, when the records have it) on a log scale, so the noise's cause shows, and
    the running mean over `window` steps (default: a twentieth of the run, at least 5) is the line
    to read.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    steps = np.asarray([r["step"] for r in records])
    losses = np.asarray([r["loss"] for r in records], dtype=np.float64)
    window = max(1, min(window or max(5, len(records) // 20), len(records)))
    running = np.convolve(losses, np.ones(window) / window, mode="valid")  # ends at each step from window on
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [3, 1]})
    if all("sigma_mean" in r for r in records):
        sigmas = np.asarray([r["sigma_mean"] for r in records], dtype=np.float64)
        points = ax1.scatter(
            steps, losses, c=sigmas, s=14, cmap="viridis", norm=LogNorm(), label="loss per step", zorder=2
        )
        fig.colorbar(points, ax=ax1, label="the step's sigma (log)", pad=0.01)
    else:
        ax1.plot(steps, losses, ".", ms=3, alpha=0.35, label="loss per step")
    ax1.plot(
        steps[window - 1 :], running, color=CONTROL_COLOR, lw=2, label=f"running mean of {window}", zorder=3
    )
    ax1.set(xlabel="step", ylabel="loss", title="training loss")
    ax1.legend()
    ax2.plot(steps, [r["lr"] for r in records])
    ax2.set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# The memory plan (notebook 04)

# One colour per part, none of them grey: the GPU-size lines are drawn in black over them.
MEMORY_COLORS = {
    "weights": "#1f77b4",
    "half_copies": "#aec7e8",
    "master_weights": "#9467bd",
    "gradients": "#ff7f0e",
    "optimizer": "#d62728",
    "ema": "#8c564b",
    "frozen": "#2ca02c",
    "batch": "#e377c2",
    "activations": "#bcbd22",
}


def memory_bars(plans, limits_gb=(24, 48, 80), title=""):
    """Stacked bars of `cnx.memory` plans (label -> MemoryPlan) in GiB per GPU, with GPU-size lines.

    The GPU sizes are labelled above the plot, where no bar hides them; the legend sits beside it.
    """
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    from cnx.memory import PARTS

    gib = 2**30
    labels = list(plans)
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(labels) + 1.6))
    left = [0.0] * len(labels)
    for part in PARTS:
        values = [plans[label].parts[part] / gib for label in labels]
        if max(values) > 0.05:
            ax.barh(labels, values, left=left, label=part, color=MEMORY_COLORS.get(part))
            left = [a + v for a, v in zip(left, values, strict=True)]
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for limit in limits_gb:
        gb_in_gib = limit  # as cnx.memory counts a card: an "80 GB" one holds about 80 GiB
        ax.axvline(gb_in_gib, color="black", ls="--", lw=1.2, zorder=3)
        ax.text(gb_in_gib, 1.01, f"{limit} GB", transform=top, ha="center", va="bottom", fontsize=9)
    for y, total in enumerate(left):
        ax.text(total + 0.5, y, f"{total:.1f}", va="center", fontsize=8)
    ax.set_xlim(0, max(*left, *limits_gb) * 1.08)
    ax.set_xlabel("GiB per GPU")
    ax.set_title(title, pad=18)
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig
