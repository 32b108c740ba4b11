"""The naive baseline, as the usual tutorial builds it. Benchmark subject only: do not deploy.

Flask's development server, the upload saved to disk, PIL + torchvision transforms, an fp32
ResNet18 with dynamic quantization of ``nn.Linear`` only (every convolution stays fp32), Top-3.
It loads the same weights as the service (so the comparison is like for like).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from flask import Flask, jsonify, request
from PIL import Image
from torch import nn
from torchvision import models
from torchvision import transforms as tv_transforms
from werkzeug.utils import secure_filename

from resnet_service.model.weights import resolve_fp32_weights

app = Flask(__name__)
UPLOAD_FOLDER = os.path.join(tempfile.gettempdir(), "naive-baseline", "static", "uploads")
os.makedirs(UPLOAD_FOLDER, exist_ok=True)

weights = (
    resolve_fp32_weights(None, allow_downloads=False, allow_random=True)
    if "NAIVE_WEIGHTS" not in os.environ
    else resolve_fp32_weights(
        __import__("pathlib").Path(os.environ["NAIVE_WEIGHTS"]),
        allow_downloads=False,
        allow_random=False,
    )
)
model = models.resnet18()
model.load_state_dict(weights.state_dict)
model.eval()
model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)  # type: ignore[no-untyped-call]
labels = models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
transform = tv_transforms.Compose(
    [
        tv_transforms.Resize(256),
        tv_transforms.CenterCrop(224),
        tv_transforms.ToTensor(),
        tv_transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ]
)


@app.route("/predict", methods=["POST"])
def predict():  # type: ignore[no-untyped-def]
    file = request.files["file"]
    path = os.path.join(UPLOAD_FOLDER, secure_filename(file.filename or "upload"))
    file.save(path)
    image = Image.open(path).convert("RGB")
    batch = transform(image).unsqueeze(0)
    with torch.no_grad():
        output = model(batch)
    probabilities = torch.nn.functional.softmax(output[0], dim=0)
    top3 = torch.topk(probabilities, 3)
    return jsonify(
        [
            {"label": labels[i], "score": float(p)}
            for p, i in zip(top3.values, top3.indices, strict=True)
        ]
    )


@app.route("/health")
def health():  # type: ignore[no-untyped-def]
    return "ok"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=5000)
    app.run(host="127.0.0.1", port=parser.parse_args().port)
