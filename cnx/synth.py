"""Synthetic dancers: procedurally animated 2-D people whose poses are known exactly.

A dancer is a little skeleton moved by sums of sinusoids (sway, bounce, arm waves,
steps) with feet kept on the floor by two-bone inverse kinematics. The same
keypoints drive two renders: an RGB frame (a cartoon person in clothes in front of
a wall and floor) and a DWPose-style pose frame (`cnx.pose.draw_pose`). That gives
a tiny dataset in the real training format, and later metrics can compare
generated poses with the true ones.

Body units: the standing dancer is about 1 tall, y points down, the floor is y = 0.
`Framing` turns body units into pixels so that every frame of the clip fits.

`cnx samples OUT_DIR [--seed N]` writes the dataset (see `write_samples`).
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cnx.pose import Keypoints, detection_entry, draw_pose, save_keypoints

SUPERSAMPLE = 2  # RGB frames are drawn at 2x and box-filtered down: smooth edges, like a camera
VALIDATION_FRAMES = 14  # the original README's validation folder holds 0.png..13.png
VALIDATION_STRIDE = 3  # frames between validation images (the tiny profile's interval_frame)

SKIN_TONES = ((255, 224, 196), (241, 194, 150), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 58, 38))
HAIR_COLORS = ((20, 16, 14), (60, 38, 24), (110, 72, 40), (200, 160, 90), (150, 60, 30), (170, 170, 170))


# ---------------------------------------------------------------------------------------------
# The dancer: appearance, proportions, motion and framing, all drawn from one Generator.


@dataclass(frozen=True)
class Wave:
    """offset + sum_i amps[i] * sin(2 pi freqs[i] t + phases[i]); t in seconds."""

    offset: float
    amps: tuple[float, ...]
    freqs: tuple[float, ...]
    phases: tuple[float, ...]

    def __call__(self, t: float) -> float:
        return self.offset + sum(
            a * math.sin(2.0 * math.pi * f * t + p)
            for a, f, p in zip(self.amps, self.freqs, self.phases, strict=True)
        )


@dataclass(frozen=True)
class Framing:
    """Body units -> pixels: pixel = origin + scale * body point."""

    width: int
    height: int
    scale: float  # pixels per body unit
    origin: tuple[float, float]  # pixel position of the body-unit origin (floor under the dancer)


@dataclass(frozen=True)
class Dancer:
    """Everything about one synthetic clip; `random_dancer` draws it, `dancer_keypoints` poses it."""

    # Appearance (RGB colours and styles).
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    shirt: tuple[int, int, int]
    legwear: tuple[int, int, int]
    shoes: tuple[int, int, int]
    hair_style: str  # "short" | "long" | "bun"
    sleeves: str  # "short" | "long"
    legwear_style: str  # "trousers" | "shorts" | "skirt"
    wall_top: tuple[int, int, int]
    wall_bottom: tuple[int, int, int]
    floor: tuple[int, int, int]
    pattern: str  # "plain" | "stripes" | "dots" | "checker" | "diagonal"
    pattern_color: tuple[int, int, int]
    horizon: float  # wall/floor boundary, in body units above the floor
    # Proportions (body units).
    head_radius: float
    neck_length: float
    torso_length: float
    shoulder_half_width: float
    hip_half_width: float
    upper_arm: float
    forearm: float
    thigh: float
    shin: float
    palm: float
    build: float  # limb thickness factor
    # Motion (t in seconds).
    fps: float
    sway: Wave
    bounce: Wave
    lean: Wave
    head_tilt: Wave
    head_yaw: Wave
    shoulder: tuple[Wave, Wave]  # arm raise from hanging, radians; [right, left]
    elbow: tuple[Wave, Wave]  # elbow bend, radians
    elbow_sign: tuple[float, float]  # +1 bends the forearm outward/up, -1 across the body
    wrist: tuple[Wave, Wave]
    stance: float  # half distance between the feet
    step_freq: float
    step_amp: float
    lift_amp: float
    step_phase: float
    hand_confidence: tuple[Wave, Wave]  # mean hand score over time; [left, right] (COCO order)
    hand_point_jitter: np.ndarray  # (2, 21) fixed per-point score offsets
    body_confidence: np.ndarray  # (18,) base body scores
    flicker_phase: np.ndarray  # (18,) phases of small body-score flicker
    framing: Framing


def _color(rng: np.random.Generator, sat=(0.3, 0.9), val=(0.3, 0.95)) -> tuple[int, int, int]:
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(*sat), rng.uniform(*val))
    return tuple(int(round(255 * c)) for c in rgb)


def _jitter(rng: np.random.Generator, color, amount=12) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def _wave(rng: np.random.Generator, offset: float, amp: float, base_freq: float, harmonics=(0.5, 1.0, 2.0)):
    """A smooth dance-like signal: a few harmonics of the tempo with random weights and phases."""
    weights = rng.uniform(0.2, 1.0, size=len(harmonics)) / np.maximum(harmonics, 1.0)  # fast parts smaller
    weights = weights / weights.sum()
    return Wave(
        offset=float(offset),
        amps=tuple(float(amp * w) for w in weights),
        freqs=tuple(float(base_freq * h) for h in harmonics),
        phases=tuple(float(p) for p in rng.uniform(0, 2 * math.pi, size=len(harmonics))),
    )


def random_dancer(
    rng: np.random.Generator, num_frames: int = 72, width: int = 256, height: int = 384, fps: float = 8
) -> Dancer:
    """Draw a dancer (looks, body, motion) and frame it so frames 0..num_frames-1 fit the image."""
    tempo = rng.uniform(0.25, 0.45)  # Hz: one dance figure every 2.2-4 s, smooth at 8 fps
    size = rng.uniform(0.92, 1.08)
    legs = rng.uniform(0.95, 1.05)
    arms = rng.uniform(0.95, 1.06)
    # Arms: a raise around a resting angle; some dancers wave both arms high, some keep them low.
    arm_style = rng.choice(["low", "mid", "wave"])
    rest, swing = {"low": (0.4, 0.55), "mid": (0.85, 0.85), "wave": (1.35, 1.25)}[str(arm_style)]
    shoulder = tuple(
        _wave(rng, rest * rng.uniform(0.7, 1.2), swing * rng.uniform(0.6, 1.0), tempo) for _ in range(2)
    )
    elbow = tuple(_wave(rng, rng.uniform(0.3, 1.1), rng.uniform(0.4, 1.0), tempo) for _ in range(2))
    elbow_sign = tuple(float(rng.choice([1.0, 1.0, -1.0])) for _ in range(2))
    wrist = tuple(_wave(rng, rng.uniform(-0.2, 0.3), 0.4, tempo, harmonics=(1.0, 2.0)) for _ in range(2))
    hand_confidence = tuple(
        _wave(rng, rng.uniform(0.4, 0.9), rng.uniform(0.15, 0.4), tempo, harmonics=(0.25, 0.5))
        for _ in range(2)
    )
    body_confidence = rng.uniform(0.8, 0.97, size=18)
    body_confidence[[14, 15, 16, 17]] -= 0.1  # small face points are found less surely
    legwear_style = str(rng.choice(["trousers", "trousers", "shorts", "skirt"]))
    skin = _jitter(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))])
    wall_top = _color(rng, sat=(0.05, 0.45), val=(0.45, 0.95))
    dancer = Dancer(
        skin=skin,
        hair=_jitter(rng, HAIR_COLORS[rng.integers(len(HAIR_COLORS))], 8),
        shirt=_color(rng),
        legwear=_color(rng, sat=(0.2, 0.8), val=(0.15, 0.7)),
        shoes=_color(rng, sat=(0.0, 0.5), val=(0.05, 0.5)),
        hair_style=str(rng.choice(["short", "long", "bun"])),
        sleeves=str(rng.choice(["short", "long"])),
        legwear_style=legwear_style,
        wall_top=wall_top,
        wall_bottom=_color(rng, sat=(0.05, 0.45), val=(0.35, 0.9)),
        floor=_color(rng, sat=(0.05, 0.5), val=(0.2, 0.7)),
        pattern=str(rng.choice(["plain", "stripes", "dots", "checker", "diagonal"])),
        pattern_color=_jitter(rng, wall_top, 30),
        horizon=float(rng.uniform(0.12, 0.4)),
        head_radius=0.066 * size * rng.uniform(0.93, 1.07),
        neck_length=0.03 * size,
        torso_length=0.3 * size * rng.uniform(0.95, 1.05),
        shoulder_half_width=0.105 * size * rng.uniform(0.88, 1.12),
        hip_half_width=0.06 * size * rng.uniform(0.88, 1.15),
        upper_arm=0.16 * size * arms,
        forearm=0.145 * size * arms,
        thigh=0.23 * size * legs,
        shin=0.22 * size * legs,
        palm=0.05 * size,
        build=float(rng.uniform(0.85, 1.2)),
        fps=float(fps),
        sway=_wave(rng, 0.0, rng.uniform(0.03, 0.08), tempo),
        bounce=_wave(rng, 0.02, rng.uniform(0.008, 0.02), tempo, harmonics=(1.0, 2.0)),
        lean=_wave(rng, 0.0, rng.uniform(0.06, 0.18), tempo),
        head_tilt=_wave(rng, 0.0, rng.uniform(0.05, 0.18), tempo),
        head_yaw=_wave(rng, 0.0, rng.uniform(0.1, 0.6), tempo, harmonics=(0.25, 0.5, 1.0)),
        shoulder=shoulder,
        elbow=elbow,
        elbow_sign=elbow_sign,
        wrist=wrist,
        stance=float(rng.uniform(0.05, 0.1) * size),
        step_freq=float(tempo / 2.0),
        step_amp=float(rng.uniform(0.0, 0.06)),
        lift_amp=float(rng.uniform(0.02, 0.08)),
        step_phase=float(rng.uniform(0, 2 * math.pi)),
        hand_confidence=hand_confidence,
        hand_point_jitter=rng.uniform(-0.06, 0.06, size=(2, 21)),
        body_confidence=body_confidence,
        flicker_phase=rng.uniform(0, 2 * math.pi, size=18),
        framing=Framing(width=width, height=height, scale=1.0, origin=(0.0, 0.0)),
    )
    return _frame_dancer(dancer, rng, num_frames)


def _frame_dancer(dancer: Dancer, rng: np.random.Generator, num_frames: int) -> Dancer:
    """Pick a scale and position so the dancer's extent over the whole clip stays in the image."""
    lo, hi = np.full(2, np.inf), np.full(2, -np.inf)
    for t in range(num_frames):
        pose = _skeleton(dancer, t)
        points = np.concatenate([pose.body, pose.hands.reshape(-1, 2), pose.extent])
        lo, hi = np.minimum(lo, points.min(axis=0)), np.maximum(hi, points.max(axis=0))
    lo, hi = lo - 0.03, hi + 0.03  # limbs are thicker than their bones
    frame = dancer.framing
    margin = 0.04 * np.array([frame.width, frame.height])
    room = np.array([frame.width, frame.height]) - 2 * margin
    scale = float((room / (hi - lo)).min() * rng.uniform(0.72, 1.0))
    slack = room - scale * (hi - lo)  # (2,) pixels left over to place the dancer
    origin = margin - scale * lo + slack * np.array([rng.uniform(0.1, 0.9), rng.uniform(0.5, 1.0)])
    framing = Framing(frame.width, frame.height, scale, (float(origin[0]), float(origin[1])))
    return replace(dancer, framing=framing)


# ---------------------------------------------------------------------------------------------
# Kinematics: body-unit skeleton for frame t.


def _dir(angle: float) -> np.ndarray:
    """Unit vector at `angle` radians from straight down (+y), turning towards +x."""
    return np.array([math.sin(angle), math.cos(angle)])


def _two_bone(
    root: np.ndarray, target: np.ndarray, l1: float, l2: float, bend_side: float, splay: float = 0.4
):
    """Middle joint and end point of a two-bone chain reaching for `target` (knee and ankle).

    Knees bend mostly towards the camera: only `splay` of the bend shows sideways in the image.
    """
    delta = target - root
    dist = float(np.hypot(*delta))
    reach = l1 + l2 - 1e-4
    if dist > reach:
        target, dist = root + delta * (reach / dist), reach
    u = (target - root) / dist
    along = (l1 * l1 + dist * dist - l2 * l2) / (2 * dist)
    across = math.sqrt(max(l1 * l1 - along * along, 0.0))
    perp = np.array([u[1], -u[0]])  # (1, 0) when the leg points straight down
    return root + along * u + splay * across * bend_side * perp, target


def _hand(dancer: Dancer, wrist: np.ndarray, angle: float, side: float, curl: float) -> np.ndarray:
    """21 hand points (wrist, thumb, index, middle, ring, little) for a hand pointing at `angle`."""
    palm = dancer.palm
    forward, across = _dir(angle), _dir(angle + math.pi / 2)  # `across * side` points to the thumb
    points = np.empty((21, 2))
    points[0] = wrist
    # Thumb: leaves the palm sideways and bends with the curl.
    base = wrist + 0.25 * palm * forward + 0.35 * palm * side * across
    points[1] = base
    direction = angle + side * (0.75 - 0.5 * curl)
    for j, length in enumerate((0.38, 0.3, 0.26)):
        base = base + palm * length * _dir(direction)
        direction -= side * 0.5 * curl
        points[2 + j] = base
    # Fingers: a fan of four chains; curled fingers fold back (shortened in projection).
    spread = (0.22, 0.05, -0.1, -0.25)
    offsets = (0.38, 0.13, -0.12, -0.36)
    lengths = ((0.45, 0.27, 0.2), (0.5, 0.3, 0.22), (0.46, 0.28, 0.21), (0.36, 0.22, 0.18))
    for f in range(4):
        base = wrist + palm * forward + offsets[f] * palm * side * across
        points[5 + 4 * f] = base
        direction = angle + side * spread[f] * (1.0 - 0.6 * curl)
        for j, length in enumerate(lengths[f]):
            base = base + palm * length * math.cos(curl * 1.3 * (j + 1)) * _dir(direction)
            points[6 + 4 * f + j] = base
    return points


@dataclass(frozen=True)
class Skeleton:
    """One frame's pose in body units (y up, origin on the floor): keypoints plus what the renderer needs."""

    body: np.ndarray  # (18, 2) OpenPose body keypoints
    body_scores: np.ndarray  # (18,)
    hands: np.ndarray  # (2, 21, 2) [left, right]
    hand_scores: np.ndarray  # (2, 21)
    head: np.ndarray  # (2,) head centre
    head_up: np.ndarray  # (2,) unit vector along the head's up axis
    head_right: np.ndarray  # (2,) unit vector to the head's right
    yaw: float  # head turn in radians (the face slides sideways)
    pelvis: np.ndarray  # (2,)
    extent: np.ndarray  # (K, 2) points the drawing reaches beyond the keypoints (hair, ears, shoes)


def _skeleton(dancer: Dancer, t: float) -> Skeleton:
    """Body-unit skeleton at frame t: keypoints plus the extra points the renderer needs."""
    s = t / dancer.fps
    # Feet: alternate little steps, each foot lifting while it moves.
    feet = []
    for side, phase in ((-1.0, 0.0), (1.0, math.pi)):  # right foot on the image's left
        cycle = 2 * math.pi * dancer.step_freq * s + dancer.step_phase + phase
        lift = dancer.lift_amp * max(0.0, math.sin(cycle)) ** 2
        x = side * dancer.stance + dancer.step_amp * math.cos(cycle)
        feet.append(np.array([x, -0.035 - lift]))  # ankle 0.035 above the sole
    leg = dancer.thigh + dancer.shin
    pelvis = np.array(
        [
            (feet[0][0] + feet[1][0]) / 2 + dancer.sway(s),
            -0.035 - leg * (1.0 - max(dancer.bounce(s), 0.005)),
        ]
    )
    lean = dancer.lean(s)
    up = -_dir(lean)  # along the spine, pelvis to neck
    right = np.array([-up[1], up[0]])  # towards +x, perpendicular to the spine
    hips = [pelvis - dancer.hip_half_width * right, pelvis + dancer.hip_half_width * right]  # [right, left]
    knees, ankles = [], []
    for side, hip, foot in zip((-1.0, 1.0), hips, feet, strict=True):
        knee, ankle = _two_bone(hip, foot, dancer.thigh, dancer.shin, side)
        knees.append(knee)
        ankles.append(ankle)
    neck = pelvis + dancer.torso_length * up
    shoulders = [
        neck - dancer.shoulder_half_width * right + 0.025 * -up,
        neck + dancer.shoulder_half_width * right + 0.025 * -up,
    ]
    # Head: tilts with the lean; yaw turns the face, sliding nose and eyes and hiding one ear.
    tilt = lean + dancer.head_tilt(s)
    yaw = float(np.clip(dancer.head_yaw(s), -0.9, 0.9))
    head_up = -_dir(tilt)
    head_right = np.array([-head_up[1], head_up[0]])
    r = dancer.head_radius
    head = neck + (dancer.neck_length + r) * head_up

    def face(x, y):  # head-frame offsets (x right, y up) in head radii
        return head + r * (x * head_right + y * head_up)

    turn = math.sin(yaw)
    nose = face(0.75 * turn, -0.15)
    eyes = [face(0.62 * turn - 0.36 * math.cos(yaw), 0.15), face(0.62 * turn + 0.36 * math.cos(yaw), 0.15)]
    ears = [face(-0.95 * math.cos(yaw) + 0.2 * turn, 0.05), face(0.95 * math.cos(yaw) + 0.2 * turn, 0.05)]
    # Arms: shoulder raise and elbow bend; hands continue the forearm, turned at the wrist.
    elbows, wrists, hands = [], [], []
    confidences = [dancer.hand_confidence[1](s), dancer.hand_confidence[0](s)]  # [right, left]
    for k, side in enumerate((-1.0, 1.0)):  # k: 0 right arm, 1 left arm (arm Waves are [right, left])
        raise_ = float(np.clip(dancer.shoulder[k](s), 0.05, 2.9))
        bend = float(np.clip(dancer.elbow[k](s), 0.0, 2.3))
        upper = lean + side * raise_
        lower = upper + side * dancer.elbow_sign[k] * bend
        elbow = shoulders[k] + dancer.upper_arm * _dir(upper)
        wrist = elbow + dancer.forearm * _dir(lower)
        curl = float(np.clip((0.6 - confidences[k]) / 0.35, 0.0, 1.0))  # an unsure hand is a fist
        hand_angle = lower + side * dancer.wrist[k](s)
        elbows.append(elbow)
        wrists.append(wrist)
        hands.append(_hand(dancer, wrist, hand_angle, side, curl))  # palms forward: thumbs point outward
    body = np.stack(
        [
            nose,
            neck,
            shoulders[0],
            elbows[0],
            wrists[0],
            shoulders[1],
            elbows[1],
            wrists[1],
            hips[0],
            knees[0],
            ankles[0],
            hips[1],
            knees[1],
            ankles[1],
            eyes[0],
            eyes[1],
            ears[0],
            ears[1],
        ]
    )
    # Scores: steady body points with a little flicker; the ear on the far side fades as the head turns.
    body_scores = np.clip(dancer.body_confidence + 0.03 * np.sin(2.1 * s + dancer.flicker_phase), 0.0, 0.99)
    body_scores[16] -= 0.9 * max(0.0, -yaw)  # right ear hides when the face turns to the image's left
    body_scores[17] -= 0.9 * max(0.0, yaw)
    hand_base = np.array([confidences[1], confidences[0]])  # COCO order: [left, right]
    hand_scores = np.clip(hand_base[:, None] + dancer.hand_point_jitter, 0.02, 0.99)
    # Points the drawing reaches beyond the keypoints: hair and bun, ears, shoes on the floor.
    extent = np.array(
        [head + 1.5 * r * head_up, head - 1.1 * r * head_right, head + 1.1 * r * head_right]
        + [[ankle[0] - 0.05, 0.0] for ankle in ankles]
        + [[ankle[0] + 0.05, 0.0] for ankle in ankles]
    )
    return Skeleton(
        body=body,
        body_scores=np.clip(body_scores, 0.0, 1.0),
        hands=np.stack([hands[1], hands[0]]),  # COCO order: [left, right]
        hand_scores=hand_scores,
        head=head,
        head_up=head_up,
        head_right=head_right,
        yaw=yaw,
        pelvis=pelvis,
        extent=extent,
    )


def dancer_keypoints(dancer: Dancer, t: int) -> Keypoints:
    """The exact pose of frame t, in the convention of `cnx.pose` (what DWPose would report)."""
    pose = _skeleton(dancer, t)
    frame = dancer.framing
    size = np.array([frame.width, frame.height])

    def norm(points):
        return ((np.asarray(frame.origin) + frame.scale * points) / size).astype(np.float32)

    return Keypoints(
        body=norm(pose.body),
        body_scores=pose.body_scores.astype(np.float32),
        hands=norm(pose.hands),
        hand_scores=pose.hand_scores.astype(np.float32),
    )


# ---------------------------------------------------------------------------------------------
# Rendering.


def render_pose_frame(dancer: Dancer, t: int) -> np.ndarray:
    """The DWPose-style pose image (H, W, 3) uint8 RGB of frame t (`cnx.pose.draw_pose`)."""
    k = dancer_keypoints(dancer, t)
    return draw_pose(
        k.body, k.body_scores, k.hands, k.hand_scores, dancer.framing.height, dancer.framing.width
    )


def render_background(dancer: Dancer):
    """Wall (vertical gradient, optional pattern) over a floor, at the supersampled size (a PIL image).

    The same for every frame of a dancer: draw it once and pass it to each `render_frame`.
    """
    from PIL import Image, ImageDraw

    frame = dancer.framing
    w, h = frame.width * SUPERSAMPLE, frame.height * SUPERSAMPLE
    horizon = int(SUPERSAMPLE * (frame.origin[1] - frame.scale * dancer.horizon))
    ramp = np.linspace(0.0, 1.0, h)[:, None]  # (h, 1)
    wall = (1 - ramp) * np.array(dancer.wall_top) + ramp * np.array(dancer.wall_bottom)  # (h, 3)
    pixels = np.repeat(wall[:, None, :], w, axis=1)  # (h, w, 3)
    floor_ramp = np.linspace(0.85, 1.1, h)[:, None]
    floor = np.clip(floor_ramp * np.array(dancer.floor), 0, 255)
    pixels[horizon:] = floor[horizon:, None, :]
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    step = max(8, int(0.09 * w))
    if dancer.pattern == "stripes":
        for x in range(0, w, 2 * step):
            draw.rectangle([x, 0, x + step // 2, horizon], fill=dancer.pattern_color)
    elif dancer.pattern == "dots":
        for y in range(step // 2, horizon, step):
            for x in range(step // 2 + (y // step % 2) * step // 2, w, step):
                draw.ellipse(
                    [x - step // 6, y - step // 6, x + step // 6, y + step // 6], fill=dancer.pattern_color
                )
    elif dancer.pattern == "diagonal":
        for x in range(-h, w, 2 * step):
            draw.line([(x, horizon), (x + horizon, 0)], fill=dancer.pattern_color, width=step // 3)
    elif dancer.pattern == "checker":
        dark = tuple(int(c * 0.8) for c in dancer.floor)
        for row, y in enumerate(range(horizon, h, step)):
            for col, x in enumerate(range(0, w, step)):
                if (row + col) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=dark)
    draw.line(
        [(0, horizon), (w, horizon)], fill=tuple(int(c * 0.7) for c in dancer.floor), width=SUPERSAMPLE * 2
    )
    return image


class _Painter:
    """Draws body-unit shapes onto a supersampled RGBA layer."""

    def __init__(self, dancer: Dancer, layer):
        from PIL import ImageDraw

        self.draw = ImageDraw.Draw(layer)
        self.origin = np.asarray(dancer.framing.origin) * SUPERSAMPLE
        self.scale = dancer.framing.scale * SUPERSAMPLE

    def px(self, point) -> np.ndarray:
        return self.origin + self.scale * np.asarray(point)

    def disc(self, center, radius: float, color) -> None:
        x, y = self.px(center)
        r = radius * self.scale
        self.draw.ellipse([x - r, y - r, x + r, y + r], fill=color)

    def ellipse(self, center, rx: float, ry: float, color) -> None:
        x, y = self.px(center)
        self.draw.ellipse(
            [x - rx * self.scale, y - ry * self.scale, x + rx * self.scale, y + ry * self.scale], fill=color
        )

    def capsule(self, a, b, ra: float, rb: float, color) -> None:
        """A tapered limb from a (half-width ra) to b (half-width rb) with rounded ends."""
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        d = b - a
        n = np.array([-d[1], d[0]]) / max(float(np.hypot(*d)), 1e-9)
        corners = [a + ra * n, b + rb * n, b - rb * n, a - ra * n]
        self.polygon(corners, color)
        self.disc(a, ra, color)
        self.disc(b, rb, color)

    def polygon(self, points, color) -> None:
        self.draw.polygon([tuple(self.px(p)) for p in points], fill=color)


def _shade(color, factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in color)


def render_frame(dancer: Dancer, t: int, background=None) -> tuple[np.ndarray, list[list[float]]]:
    """The RGB frame (H, W, 3) uint8 of frame t and the person's box [[x0, y0], [x1, y1]] (normalised).

    The box is the tight box around the drawn person, as a person detector would give.
    """
    from PIL import Image

    frame = dancer.framing
    size = (frame.width * SUPERSAMPLE, frame.height * SUPERSAMPLE)
    image = (background if background is not None else render_background(dancer)).copy()
    pose = _skeleton(dancer, t)
    b = pose.body
    w = dancer.build
    skin, skin_dark = dancer.skin, _shade(dancer.skin, 0.85)

    # Floor shadow goes straight onto the background.
    floor = Image.new("RGBA", size, (0, 0, 0, 0))
    shadow = _Painter(dancer, floor)
    shadow.ellipse([pose.pelvis[0], -0.01], 0.16, 0.025, (0, 0, 0, 70))
    image = Image.alpha_composite(image.convert("RGBA"), floor)

    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    p = _Painter(dancer, layer)
    head, head_up, r = pose.head, pose.head_up, dancer.head_radius
    if dancer.hair_style == "long":  # hair falling behind the shoulders
        p.capsule(head, head - 2.1 * r * head_up, 1.05 * r, 0.95 * r, dancer.hair)

    # Legs, shoes, then the trousers' seat, shorts or skirt.
    trousers = dancer.legwear
    for hip, knee, ankle, side in ((b[8], b[9], b[10], -1.0), (b[11], b[12], b[13], 1.0)):
        thigh_color = skin if dancer.legwear_style == "skirt" else trousers
        shin_color = trousers if dancer.legwear_style == "trousers" else skin
        p.capsule(knee, ankle, 0.03 * w, 0.022 * w, shin_color)
        p.capsule(hip, knee, 0.042 * w, 0.031 * w, thigh_color)
        if dancer.legwear_style == "shorts":
            p.capsule(hip, hip + 0.55 * (knee - hip), 0.046 * w, 0.04 * w, trousers)
        p.ellipse(ankle + [side * 0.012, 0.022], 0.034, 0.018, dancer.shoes)
    p.polygon(
        [
            b[8] + [-0.04 * w, -0.02],
            b[11] + [0.04 * w, -0.02],
            b[11] + [0.035 * w, 0.05],
            b[8] + [-0.035 * w, 0.05],
        ],
        trousers,
    )
    if dancer.legwear_style == "skirt":
        hem = (b[9] + b[12]) / 2 - [0, 0.03]
        p.polygon(
            [b[8] + [-0.045, -0.01], b[11] + [0.045, -0.01], hem + [0.13, 0.0], hem + [-0.13, 0.0]], trousers
        )

    # Torso: shirt from shoulders to hips, rounded at the shoulders.
    shirt, sleeve_r = dancer.shirt, 0.034 * w
    p.polygon(
        [b[2] + [-0.01, -0.015], b[5] + [0.01, -0.015], b[11] + [0.035, 0.0], b[8] + [-0.035, 0.0]], shirt
    )
    p.disc(b[2], sleeve_r, shirt)
    p.disc(b[5], sleeve_r, shirt)

    # Neck and head, hair on top, a simple face.
    p.capsule(b[1] + 0.01 * head_up, head - 0.5 * r * head_up, 0.026, 0.026, skin_dark)
    p.polygon([b[1] + [-0.035, 0.005], b[1] + [0.035, 0.005], b[1] + [0.0, 0.045]], skin_dark)  # collar
    for ear, score in ((b[16], pose.body_scores[16]), (b[17], pose.body_scores[17])):
        if score > 0.45:
            p.disc(ear, 0.2 * r, skin_dark)
    right = pose.head_right

    def face(points):  # head-frame (x right, y up) offsets in head radii -> body units
        return [head + r * (x * right + y * head_up) for x, y in points]

    around = np.linspace(0.0, 2 * math.pi, 40, endpoint=False)
    p.polygon(face(zip(0.88 * np.cos(around), np.sin(around), strict=True)), skin)
    turn = math.sin(pose.yaw)
    arc = np.linspace(0.1, math.pi - 0.1, 24)
    fringe = [(-0.8 + 0.5 * turn, 0.42), (0.5 * turn, 0.55), (0.8 + 0.5 * turn, 0.42)]
    p.polygon(
        face(list(zip(0.95 * np.cos(arc), 1.1 * np.sin(arc) + 0.06, strict=True)) + fringe[::-1]), dancer.hair
    )
    if dancer.hair_style == "bun":
        p.disc(head + 1.05 * r * head_up, 0.42 * r, dancer.hair)
    for eye in (b[14], b[15]):
        p.disc(eye, 0.11 * r, (35, 28, 25))
    mouth = face([(0.75 * turn - 0.2, -0.5), (0.75 * turn + 0.2, -0.5), (0.75 * turn, -0.58)])
    p.polygon(mouth, _shade(skin, 0.6))

    # Arms over the torso: sleeve on the upper arm (and forearm for long sleeves), then hands.
    arm_color = shirt if dancer.sleeves == "long" else skin
    for s_i, e_i, w_i in ((2, 3, 4), (5, 6, 7)):
        p.capsule(b[e_i], b[w_i], 0.022 * w, 0.017 * w, arm_color)
        p.capsule(b[s_i], b[e_i], 0.027 * w, 0.023 * w, arm_color)
        if dancer.sleeves == "short":
            p.capsule(b[s_i], b[s_i] + 0.5 * (b[e_i] - b[s_i]), sleeve_r, 0.029 * w, shirt)
    for hand in pose.hands:
        p.polygon([hand[0], hand[5], hand[9], hand[13], hand[17]], skin)
        p.disc(hand[0], 0.016, skin)
        for f in range(5):
            chain = hand[4 * f + 1 : 4 * f + 5]  # base to tip
            for a, c in zip(chain[:-1], chain[1:], strict=True):
                p.capsule(a, c, 0.0075, 0.0065, skin)

    box = layer.getbbox()  # tight box around opaque pixels, supersampled
    image = Image.alpha_composite(image, layer).convert("RGB").reduce(SUPERSAMPLE)
    if box is None:
        raise ValueError("the dancer was drawn outside the image")
    person_box = [[box[0] / size[0], box[1] / size[1]], [box[2] / size[0], box[3] / size[1]]]
    return np.asarray(image, dtype=np.uint8), person_box


# ---------------------------------------------------------------------------------------------
# Writing the dataset.


def _render_clip(dancer: Dancer, frame_ids) -> tuple[list, list, list, list[Keypoints]]:
    background = render_background(dancer)
    rgb, poses, entries, keypoints = [], [], [], []
    for t in frame_ids:
        image, person_box = render_frame(dancer, t, background)
        k = dancer_keypoints(dancer, t)
        rgb.append(image)
        poses.append(draw_pose(k.body, k.body_scores, k.hands, k.hand_scores, image.shape[0], image.shape[1]))
        entries.append(detection_entry(person_box, k.hands, k.hand_scores))
        keypoints.append(k)
    return rgb, poses, entries, keypoints


def write_samples(
    out_dir: str | Path,
    seed: int = 0,
    num_clips: int = 8,
    num_frames: int = 72,
    width: int = 256,
    height: int = 384,
    fps: float = 8,
    crf: int = 18,
) -> Path:
    """Write a synthetic dataset in the training format; returns the meta_info.json path.

    out_dir/videos/<name>.mp4     RGB clips                 out_dir/poses/<name>.mp4  pose videos
    out_dir/meta/<name>.json      per-frame detections      out_dir/keypoints/<name>.npz  known poses
    out_dir/meta_info.json        [{video_path, guide_path, meta_info}] relative to out_dir
    out_dir/validation/           ground_truth/0..13.png, pose/0..13.png, reference_image.png
                                  (a held-out dancer; keypoints/validation.npz holds its poses)
    Same arguments -> byte-identical files.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from cnx.video import write_video

    if num_clips < 1 or num_frames < 1:
        raise ValueError(
            f"need at least one clip and one frame, got {num_clips} clips of {num_frames} frames"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_info = []
    for i in tqdm(range(num_clips), desc="synthetic dancers", unit="clip"):
        name = f"dancer_{i:03d}"
        dancer = random_dancer(np.random.default_rng([seed, i]), num_frames, width, height, fps)
        rgb, poses, entries, keypoints = _render_clip(dancer, range(num_frames))
        write_video(out_dir / "videos" / f"{name}.mp4", rgb, fps=fps, crf=crf)
        write_video(out_dir / "poses" / f"{name}.mp4", poses, fps=fps, crf=crf)
        (out_dir / "meta").mkdir(exist_ok=True)
        (out_dir / "meta" / f"{name}.json").write_text(json.dumps(entries))
        save_keypoints(out_dir / "keypoints" / f"{name}.npz", keypoints, width, height, fps)
        meta_info.append(
            {
                "video_path": f"videos/{name}.mp4",
                "guide_path": f"poses/{name}.mp4",
                "meta_info": f"meta/{name}.json",
            }
        )
    meta_path = out_dir / "meta_info.json"
    meta_path.write_text(json.dumps(meta_info, indent=2) + "\n")

    # Validation: a dancer no clip shows, sampled every VALIDATION_STRIDE frames like training.
    span = VALIDATION_FRAMES * VALIDATION_STRIDE
    dancer = random_dancer(np.random.default_rng([seed, 1_000_000]), span, width, height, fps)
    frame_ids = range(0, span, VALIDATION_STRIDE)
    rgb, poses, _, keypoints = _render_clip(dancer, frame_ids)
    validation = out_dir / "validation"
    for folder, images in (("ground_truth", rgb), ("pose", poses)):
        (validation / folder).mkdir(parents=True, exist_ok=True)
        for j, image in enumerate(images):
            Image.fromarray(image).save(validation / folder / f"{j}.png")
    Image.fromarray(rgb[0]).save(validation / "reference_image.png")
    save_keypoints(
        out_dir / "keypoints" / "validation.npz", keypoints, width, height, fps / VALIDATION_STRIDE
    )
    return meta_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cnx samples", description="Write synthetic dancer clips in the training format."
    )
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files")
    parser.add_argument("--num_clips", type=int, default=8, help="clips to write")
    parser.add_argument("--num_frames", type=int, default=72, help="frames per clip")
    parser.add_argument("--width", type=int, default=256, help="even, >= 64")
    parser.add_argument("--height", type=int, default=384, help="even")
    args = parser.parse_args(argv)
    if args.width < 64 or args.width % 2 or args.height % 2 or args.height < 2:
        parser.error(f"--width must be even and >= 64 and --height even, got {args.width}x{args.height}")
    start = time.perf_counter()
    meta_path = write_samples(
        args.out_dir,
        seed=args.seed,
        num_clips=args.num_clips,
        num_frames=args.num_frames,
        width=args.width,
        height=args.height,
    )
    out = meta_path.parent
    elapsed = time.perf_counter() - start
    size = f"{args.width}x{args.height}"
    print(f"wrote {args.num_clips} clips of {args.num_frames} frames ({size}) in {elapsed:.1f} s")
    print(f"  meta info:   {meta_path}")
    print(f"  videos:      {out / 'videos'}  poses: {out / 'poses'}  detections: {out / 'meta'}")
    print(f"  keypoints:   {out / 'keypoints'}")
    print(f"  validation:  {out / 'validation'}")
    return 0
