#!/usr/bin/env bash
# Issue 6 on one GPU (H100/H200), as one short run: throughput.py at the paper's 448 px (ResNet-101 --cal training
# with CPU decoding by 16 workers and with --gpu-decode, UD distillation ResNet-101 -> ResNet-18, inference); that
# DeviceFeeder's thread and side stream give the batches and predictions of inline preparation (feeder_check.py);
# one short epoch of train.py, distill.py and validate.py as a user runs them (bf16, --gpu-decode); then how far
# the GPU path's pixels are from the CPU path's (nvJPEG vs libjpeg). Uses the machine's own torch, torchvision,
# timm and accelerate; writes gpu_check.log and throughput.csv under $OUT (default: a temp dir).
#
#   bash benchmarks/gpu_check.sh        # about 3 minutes on an H200 (each part has its own time limit)
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
VOC=/tmp/synthetic-voc
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd "$(dirname "$0")/.."
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  df -h /dev/shm | tail -1  # 16 workers pass uint8 batches through shared memory
  python3 -c "import torch, torchvision, timm, accelerate as a; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'timm', timm.__version__, 'accelerate', a.__version__)"
  timeout 240 python3 benchmarks/throughput.py --model resnet101 --cal --teacher resnet101 --student resnet18 \
    --img-size 448 --batch-size 64 --mixed-precision bf16 --channels-last --workers 16 --num-images 1500 --steps 30 \
    --cal-rounds 6 --synthetic-voc "$VOC" --csv "$OUT/throughput.csv"
  timeout 60 python3 benchmarks/feeder_check.py --data-dir "$VOC" --img-size 448 -b 32 --workers 8
  RUNS=/tmp/gpu-check-runs  # the checkpoints stay off $OUT
  rm -rf "$RUNS"
  RUN=(--dataset voc2007 --data-dir "$VOC" --img-size 224 -b 64 --epochs 1 --workers 16 --mixed-precision bf16
       --channels-last --no-progress --output "$RUNS")
  timeout 60 python3 train.py "${RUN[@]}" --model resnet18 --cal --gpu-decode --experiment teacher
  timeout 60 python3 distill.py "${RUN[@]}" --model resnet18 --teacher-ckpt "$RUNS/teacher/best.safetensors" \
    --att-weight 0.5 --experiment student
  timeout 60 python3 validate.py --checkpoint "$RUNS/student/best.safetensors" --data-dir "$VOC" -b 64 \
    --workers 16 --mixed-precision bf16 --gpu-decode --no-progress
  timeout 30 python3 - "$VOC" <<'EOF'
import glob, random, sys, time
import torch
from udtimm.data.base import read_encoded, read_image
from udtimm.data.gpu import DeviceTransform, collate_encoded
from udtimm.data.transforms import eval_transform, train_transform

files = sorted(glob.glob(f"{sys.argv[1]}/VOC2007/JPEGImages/*.jpg"))[:64]
mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
batch = collate_encoded([(read_encoded(f), torch.zeros(1), torch.zeros(1, dtype=torch.bool), i)
                         for i, f in enumerate(files)])[0]
levels = torch.tensor(std).view(1, 3, 1, 1) * 255  # normalised difference back to 0-255 pixel levels
for name, train, cpu_transform in (("eval", False, eval_transform(448, mean, std)),
                                   ("train", True, train_transform(448, mean, std))):
    random.seed(0), torch.manual_seed(0)
    gpu = DeviceTransform(448, mean, std, "cuda", train=train)(batch).cpu()
    random.seed(0), torch.manual_seed(0)
    cpu = torch.stack([cpu_transform(read_image(f)) for f in files])
    diff = ((gpu - cpu) * levels).abs()
    print(f"{name} transform, GPU (nvJPEG) vs CPU path, same draws: |diff| max {diff.max():.1f}, "
          f"mean {diff.mean():.3f}, 99.9th pct {diff.flatten().kthvalue(int(diff.numel() * 0.999)).values:.1f} levels")
transform = DeviceTransform(448, mean, std, "cuda", train=True)
for name, work in (("decode", lambda: transform.decode(batch)), ("decode + train transform", lambda: transform(batch))):
    work()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        work()
    torch.cuda.synchronize()
    print(f"{name}: {(time.perf_counter() - start) * 100:.1f} ms per batch of {len(files)} (host, GPU idle)")
EOF
} 2>&1 | tee "$OUT/gpu_check.log"
