"""The default object detector: digits composed into scenes (scenes.py), a small anchor-free
detector (model.py), its training loop (train.py) and COCO evaluation (evaluate.py).

Entry points: `train.train_detector(DetectorConfig()) -> TrainedDetector` and
`evaluate.coco_map(scenes, detections)`. Post-processing (letterbox, NMS, box mapping) lives in
serving/boxes.py, torch-free, and is shared by training's evaluation and the service.
"""
