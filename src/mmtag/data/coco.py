"""The COCO category names of the reference task's label ids (1–19; 12 does not exist).

A module of its own because both the data reader (default label names) and caption augmentation
(label words never replaced) read it, and neither should import the other for a table.
"""
from __future__ import annotations

COCO_NAMES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse",
}
