"""Figures of cnx.viz: they draw what they are given, with the promised axes and colour scales."""

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cnx import viz  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Model figures (notebook 02)


def test_controlnext_diagram_is_one_drawing():
    fig = viz.controlnext_diagram()
    assert len(fig.axes) == 1 and not fig.axes[0].axison
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "down_blocks[0]" in texts and "ControlNeXt" in texts
    plt.close(fig)


def test_pose_frames_figure_shows_source_and_resized_rows():
    source = np.zeros((8, 384, 256, 3), np.uint8)  # (F, Hs, Ws, 3)
    resized = np.zeros((8, 96, 64, 3), np.uint8)  # (F, H, W, 3)
    fig = viz.pose_frames_figure(source, resized)
    assert len(fig.axes) == 2 * 6  # two rows, 6 frames spread over the clip
    assert "256x384" in fig.axes[0].get_ylabel() and "64x96" in fig.axes[6].get_ylabel()
    assert fig.axes[6].images[0].get_array().shape[:2] == (96, 64)
    plt.close(fig)
    fig = viz.pose_frames_figure(source, resized, frames=[0, 7])
    assert len(fig.axes) == 4
    plt.close(fig)


def test_parameter_bars_log_scale_one_bar_each():
    fig = viz.parameter_bars({"small": 3_526_400, "big": 1_524_623_082})
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and len(ax.patches) == 2
    plt.close(fig)


def test_cross_norm_histograms_share_axes_and_report_the_mismatch():
    g = torch.Generator().manual_seed(0)
    hidden, raw = torch.randn(32, 6, 4, generator=g), torch.randn(32, 12, 8, generator=g)
    hidden, raw = 0.4 * hidden / hidden.std(), 20.0 * raw / raw.std()  # raw: exactly 50x h's std
    matched = (raw - raw.mean()) / raw.std() * hidden.std() + hidden.mean()
    fig = viz.cross_norm_histograms(hidden, raw, matched)
    assert len(fig.axes) == 6  # 2 rows x (as is, zero conv, cross-normalised)
    top, bottom = fig.axes[:3], fig.axes[3:]
    assert all(ax.get_xlim() == top[0].get_xlim() and ax.get_ylim() == top[0].get_ylim() for ax in top)
    assert all(ax.get_xlim() == bottom[0].get_xlim() for ax in bottom)
    assert bottom[0].get_xlim()[1] < top[0].get_xlim()[1]  # the bottom row zooms in on h
    assert "50x" in top[0].get_title() and "1.00x" in top[2].get_title()
    assert [tuple(line.get_xdata()) for line in top[1].lines] == [(0.0, 0.0)]  # the zero conv adds 0
    plt.close(fig)


def test_change_maps_share_one_colour_scale_and_colourbar():
    maps = {"scale 0.2": torch.full((12, 8), 0.1), "scale 1.0": np.full((12, 8), 0.7)}
    fig = viz.change_maps(maps, pose=np.zeros((96, 64, 3), np.uint8))
    assert len(fig.axes) == 1 + 2 + 1  # pose, two maps, one colourbar
    images = [ax.images[0] for ax in fig.axes[1:3]]
    assert {im.get_clim() for im in images} == {(0.0, 0.7)}  # one vmax: the largest value
    colorbar = fig.axes[-1]
    assert colorbar.get_ylim() == (0.0, 0.7)
    plt.close(fig)
    fig = viz.change_maps({"scale 0.2": np.full((12, 8), 0.1)}, vmax=2.0)  # a fixed scale, as the slider uses
    assert len(fig.axes) == 2 and fig.axes[0].images[0].get_clim() == (0.0, 2.0)
    plt.close(fig)


def test_relative_change_curve_marks_the_default():
    fig = viz.relative_change_curve([0.0, 0.2, 1.0], [0.0, 0.1, 0.4], default=0.2)
    (ax,) = fig.axes
    assert list(ax.lines[0].get_xdata()) == [0.0, 0.2, 1.0]
    assert tuple(ax.lines[1].get_xdata()) == (0.2, 0.2)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Dataset and loss figures (notebooks 01 and 03)


def _detections():
    from cnx.meta import FrameDetections

    return FrameDetections(
        boxes=np.array([[[0.1, 0.1], [0.9, 0.9]]]),
        hands_boxes=np.array([[[0.2, 0.2], [0.3, 0.3]], [[0.6, 0.6], [0.7, 0.7]]]),
        hands_score=np.array([[0.9] * 21, [0.2] * 21]),  # one confident hand, one not
    )


def _sample(num_frames=3, height=12, width=8):
    g = torch.Generator().manual_seed(0)
    weights = torch.ones(num_frames, 1, height, width)
    weights[1:, :, 2:5, 2:5] = 4.2
    return {
        "pixel_values": torch.rand(num_frames, 3, height, width, generator=g) * 2 - 1,
        "pose_frames": torch.rand(num_frames, 3, height, width, generator=g),
        "hand_weights": weights,
        "frame_indices": torch.tensor([7, 1, 4])[:num_frames],
    }


def test_draw_boxes_adds_one_patch_per_box_coloured_by_confidence():
    fig, ax = plt.subplots()
    patches = viz.draw_boxes(ax, _detections(), width=200, height=100)
    assert len(patches) == len(ax.patches) == 3  # one person, two hands
    colours = [matplotlib.colors.to_hex(p.get_edgecolor()) for p in patches]
    assert colours == ["#ffffff", "#00ff00", "#ff0000"]  # person white, confident lime, other red
    assert patches[0].get_xy() == (20.0, 10.0) and np.isclose(patches[0].get_width(), 160.0)
    plt.close(fig)


def test_frame_figures_have_the_promised_axes():
    video = np.zeros((5, 24, 16, 3), np.uint8)
    detections = [_detections()] * 5
    fig = viz.frame_pair(video[0], video[0], detections[0])
    assert len(fig.axes) == 2 and len(fig.axes[0].patches) == 3
    plt.close(fig)
    fig = viz.frame_strip(video, video, detections, [0, 2, 4])
    assert len(fig.axes) == 2 * 3 and all(len(ax.patches) == 3 for ax in fig.axes[:3])
    plt.close(fig)
    fig = viz.image_row({"a": video[0], "b": viz.as_rgb(torch.zeros(3, 24, 16))})
    assert len(fig.axes) == 2
    plt.close(fig)
    fig = viz.score_histogram(np.linspace(0, 1, 50), 0.5)
    assert len(fig.axes) == 1 and "50% of hands above" in fig.axes[0].get_legend().texts[0].get_text()
    plt.close(fig)


def test_detection_panels_show_frame_pose_and_boxes_over_the_overlay():
    import pytest

    frame = np.full((24, 16, 3), 100, np.uint8)
    pose = np.zeros_like(frame)
    overlay = frame.copy()
    overlay[5, 5] = (255, 0, 0)
    fig = viz.detection_panels(frame, pose, _detections(), overlay=overlay, title="photo")
    assert [ax.get_title() for ax in fig.axes] == ["frame", "pose drawn", "pose over the frame, boxes"]
    assert [len(ax.patches) for ax in fig.axes] == [0, 0, 3]  # one person, two hands, on the last panel
    np.testing.assert_array_equal(fig.axes[2].images[0].get_array(), overlay)
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), frame)
    assert fig.get_suptitle() == "photo"
    plt.close(fig)
    fig = viz.detection_panels(frame, pose, _detections())  # no overlay: the boxes go on the frame
    assert fig.axes[2].get_title() == "boxes"
    np.testing.assert_array_equal(fig.axes[2].images[0].get_array(), frame)
    plt.close(fig)
    with pytest.raises(ValueError, match="differ in shape"):
        viz.detection_panels(frame, pose, _detections(), overlay=overlay[:12])
    plt.close("all")


def test_clip_timeline_one_row_per_clip():
    from cnx.data import sample_clip, sample_generator

    clips = [sample_clip(40, 4, k, sample_generator(0, 0, 0)) for k in (1, 3)]
    fig = viz.clip_timeline(clips, ["one", "three"], 40)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["one", "three"]
    assert len(ax.collections) == 3 * 2  # frames, frame 0, reference per clip
    plt.close(fig)


def test_as_rgb_reads_value_ranges_and_layouts():
    assert viz.as_rgb(torch.full((3, 4, 2), -1.0)).shape == (4, 2, 3)
    assert viz.as_rgb(torch.full((3, 4, 2), -1.0)).max() == 0.0
    assert viz.as_rgb(np.full((4, 2, 3), 0.5), (0.0, 1.0)).min() == 0.5
    assert viz.as_rgb(np.full((4, 2, 3), 255, np.uint8)).min() == 1.0


def test_sample_grid_rows_frames_and_a_colourbar_for_hand_weights():
    sample = _sample()
    fig = viz.sample_grid(sample)
    assert len(fig.axes) == 3 * 3 + 1  # 3 rows x 3 frames, and the colourbar
    assert fig.axes[0].get_title() == "ref #7"
    overlay = fig.axes[2 * 3 + 1].images[1].get_array()  # hand_weights row, frame 1: the weights layer
    assert overlay.mask[0, 0] and not overlay.mask[3, 3]  # weight 1 left clear, hands coloured
    plt.close(fig)
    fig = viz.sample_grid(sample, rows=("pixel_values", "pose_frames"))
    assert len(fig.axes) == 2 * 3  # no hand weights, no colourbar
    plt.close(fig)


def test_hand_weight_figure_and_crop_windows():
    from cnx.data import crop_window

    weights = torch.ones(12, 8)
    weights[2:5, 2:5] = 4.2
    rgb = np.zeros((12, 8, 3))
    fig = viz.hand_weight_figure(rgb, weights, pooled=torch.ones(3, 2))
    assert len(fig.axes) == 3 + 1  # frame, overlay, pooled, colourbar
    plt.close(fig)
    fig = viz.hand_weight_figure(rgb, weights, boxes=[((0.2, 0.2, 0.5, 0.5), "lime")], frame=False)
    assert len(fig.axes) == 1 + 1 and len(fig.axes[0].patches) == 1
    plt.close(fig)
    frame = np.zeros((96, 64, 3), np.uint8)
    windows = {"square": [crop_window(64, 96, 32, 32, o) for o in (0.0, 0.5, 1.0)]}
    fig = viz.crop_windows(frame, windows, {"square": torch.zeros(3, 32, 32, dtype=torch.uint8)})
    assert len(fig.axes) == 2 and len(fig.axes[0].patches) == 3
    assert fig.axes[0].patches[1].get_edgecolor() == matplotlib.colors.to_rgba("yellow")  # the centred one
    plt.close(fig)


def test_noise_panels_one_row_per_signal_one_column_per_sigma():
    sigmas = torch.tensor([0.0, 1.0, 10.0])
    rows = {"pixels": torch.zeros(3, 3, 12, 8), "latent": torch.zeros(3, 4, 6, 4)}
    fig = viz.noise_panels(rows, sigmas, {"pixels": [1.0, 0.5, 0.1], "latent": [1.0, 0.7, 0.2]})
    assert len(fig.axes) == 2 * 3
    assert fig.axes[1].get_title() == "sigma = 1" and fig.axes[4].get_xlabel() == "corr 0.70"
    assert fig.axes[3].images[0].get_array().shape == (6, 4)  # a latent row shows channel 0
    plt.close(fig)


def test_share_bars_pairs_observed_with_stated():
    fig = viz.share_bars({"a": 0.1, "b": 0.9}, {"a": 0.12, "b": 0.88}, title="t")
    (ax,) = fig.axes
    assert len(ax.patches) == 4 and ax.get_title() == "t"
    plt.close(fig)


def test_table_and_describe_show_every_row():
    table = viz.table([{"dtype": "float32", "count": 1000}, {"dtype": "bfloat16", "count": 14}])
    text = str(table).splitlines()
    assert text[0].split() == ["dtype", "count"] and text[2].split() == ["bfloat16", "14"]
    assert "<td>bfloat16</td>" in table._repr_html_()
    described = str(viz.describe({"x": torch.zeros(2, 3), "name": "clip"}))
    assert "(2, 3)" in described and "float32" in described and "clip" in described


def test_slider_view_draws_the_static_fallback():
    import ipywidgets as widgets

    calls = []

    def draw(t):
        calls.append(t)
        fig, _ = plt.subplots()
        return fig

    fig = viz.slider_view(draw, t=widgets.IntSlider(value=3, min=0, max=5))
    assert calls == [3, 3]  # once for the widget, once for the static figure
    assert isinstance(fig, matplotlib.figure.Figure)
    static = viz.slider_view(draw, static=lambda: plt.figure(), t=widgets.IntSlider(value=1))
    assert calls[-1] == 1 and static is not fig
    plt.close("all")


def test_overlay_pose_blends_only_the_skeleton():
    import pytest

    from cnx.overlay import overlay_pose

    frames = np.full((2, 4, 5, 3), 100, dtype=np.uint8)
    poses = np.zeros_like(frames)
    poses[1, 2, 3] = (255, 0, 0)  # one skeleton pixel in frame 1
    out = overlay_pose(frames, poses, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == frames.shape
    np.testing.assert_array_equal(out[1, 2, 3], (178, 50, 50))  # half frame, half pose (177.5 rounds to even)
    untouched = np.ones(frames.shape[:3], bool)
    untouched[1, 2, 3] = False
    np.testing.assert_array_equal(out[untouched], frames[untouched])
    with pytest.raises(ValueError, match="differ in shape"):
        overlay_pose(frames, poses[:1])


def test_the_memory_bars_label_the_gpu_sizes_above_the_bars_and_colour_no_part_grey():
    from cnx import memory, viz

    plans = {
        f"{gpus} GPU": memory.plan_memory(memory.MemoryOptions(profile="tiny", num_gpus=gpus))
        for gpus in (1, 8)
    }
    fig = viz.memory_bars(plans, limits_gb=(24, 80))
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text().endswith(" GB")]
    assert [t.get_text() for t in labels] == ["24 GB", "80 GB"] and all(
        t.get_position()[1] > 1 for t in labels
    )
    assert all(line.get_color() == "black" for line in ax.lines)  # the GPU-size lines
    assert "grey" not in viz.MEMORY_COLORS.values() and set(viz.MEMORY_COLORS) == set(memory.PARTS)
    legend = ax.get_legend()
    assert legend.get_bbox_to_anchor().x0 >= ax.get_window_extent().x1  # beside the axes, over no bar
    plt.close(fig)


def test_the_loss_curve_colours_each_step_by_its_sigma():
    from cnx import viz

    records = [{"step": s, "loss": 0.1 * s, "lr": 1e-4, "sigma_mean": 0.1 * s} for s in range(1, 11)]
    fig = viz.loss_curve(records)
    points = fig.axes[0].collections[0]
    assert list(points.get_array()) == [r["sigma_mean"] for r in records]
    assert any("sigma" in ax.get_ylabel() for ax in fig.axes)  # the colour bar
    plt.close(fig)
    fig = viz.loss_curve([{k: v for k, v in r.items() if k != "sigma_mean"} for r in records])  # older logs
    plt.close(fig)
