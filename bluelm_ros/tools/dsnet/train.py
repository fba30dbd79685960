"""Train DSNet (torch): SGD + poly LR, OHEM CE on the main head + CE on the aux heads.

Recipe from the paper (spec: shared/papers/dsnet.md): SGD momentum 0.9, poly power 0.9,
loss = 0.6 * OHEM-CE(main, thresh 0.9) + 0.2 * CE(aux_p) + 0.2 * CE(aux_d), random scale,
crop and horizontal flip. Checkpoints are written in the official format
({'epoch', 'best_mIoU', 'state_dict': {'model.<key>': ...}, 'optimizer'}) so our own
models go through the same loader as official ones.
"""
import json
import os
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from bluelm_ros.tools.dsnet.checkpoint import load_official_state_dict
from bluelm_ros.data.datasets import open_dataset
from bluelm_ros.tools.dsnet.model import DSNet
from bluelm_ros.runtime.labels import IGNORE_ID
from bluelm_ros.tools.dsnet.metrics import confusion_matrix, format_report, mean_iou
from bluelm_ros.runtime.segmenter import normalize


class AugmentedDataset(Dataset):
    """Random scale, crop (padded with ignore) and flip around a (rgb, label) dataset."""

    def __init__(self, base, crop, scale=(0.5, 1.5), seed=0):
        self.base, self.crop, self.scale, self.seed = base, crop, scale, seed
        self.epoch = 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        rng = np.random.default_rng((self.seed, self.epoch, i))
        img, lab = self.base[i]
        s = rng.uniform(*self.scale)
        img = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
        lab = cv2.resize(lab, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
        ch, cw = self.crop
        ph, pw = max(ch - img.shape[0], 0), max(cw - img.shape[1], 0)
        if ph or pw:
            img = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=0)
            lab = cv2.copyMakeBorder(lab, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=IGNORE_ID)
        y = rng.integers(0, img.shape[0] - ch + 1)
        x = rng.integers(0, img.shape[1] - cw + 1)
        img, lab = img[y:y + ch, x:x + cw], lab[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        x = normalize(np.ascontiguousarray(img), (ch, cw))[0]
        return torch.from_numpy(x), torch.from_numpy(lab.astype(np.int64))


def ohem_ce(logits, target, thresh=0.9, min_kept=131072):
    """Return the OHEM cross-entropy (online hard example mining).

    Averages over pixels whose true-class probability is below thresh, keeping at least
    min_kept of the hardest pixels.
    """
    pixel_loss = F.cross_entropy(logits, target, ignore_index=IGNORE_ID, reduction='none')
    valid = target != IGNORE_ID
    if not valid.any():
        return pixel_loss.sum() * 0
    with torch.no_grad():
        prob = torch.exp(-pixel_loss[valid])  # softmax prob of the true class
        k = min(int(min_kept), prob.numel()) - 1
        threshold = max(thresh, float(prob.kthvalue(k + 1).values)) if k >= 0 else thresh
    losses = pixel_loss[valid]
    return losses[prob < threshold].mean() if (prob < threshold).any() else losses.mean()


def dsnet_loss(outputs, target, thresh=0.9, min_kept=131072):
    """Loss of the paper over [aux_p, main, aux_d] (or just main logits)."""
    if isinstance(outputs, torch.Tensor):
        return ohem_ce(outputs, target, thresh, min_kept)
    aux_p, main, aux_d = outputs
    return (0.6 * ohem_ce(main, target, thresh, min_kept)
            + 0.2 * F.cross_entropy(aux_p, target, ignore_index=IGNORE_ID)
            + 0.2 * F.cross_entropy(aux_d, target, ignore_index=IGNORE_ID))


def save_official(path, model, optimizer, iteration, best_miou):
    """Write a checkpoint in the official DSNet .pth.tar layout (keys prefixed model.)."""
    state = {'model.' + k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path + '.tmp'
    torch.save({'epoch': iteration, 'best_mIoU': float(best_miou), 'state_dict': state,
                'optimizer': optimizer.state_dict() if optimizer else None}, tmp)
    os.replace(tmp, path)  # atomic: a killed job never leaves a half-written checkpoint


@torch.no_grad()
def evaluate_torch(model, dataset, size, num_classes, device='cpu'):
    """Run the model at a fixed input size over a dataset; return the confusion matrix."""
    model.eval()
    conf = np.zeros((num_classes, num_classes), np.int64)
    for i in range(len(dataset)):
        img, lab = dataset[i]
        x = torch.from_numpy(normalize(img, size)).to(device)
        pred = model(x).argmax(1)[0].cpu().numpy().astype(np.uint8)
        pred = cv2.resize(pred, (lab.shape[1], lab.shape[0]), interpolation=cv2.INTER_NEAREST)
        conf += confusion_matrix(pred, lab, num_classes)
    return conf


def train(args):
    torch.manual_seed(args.seed)
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    base = open_dataset(args.dataset, args.data_root, 'train', length=args.train_size,
                        height=args.height, width=args.width)
    val = open_dataset(args.dataset, args.data_root, 'val', length=args.val_size,
                       height=args.height, width=args.width)
    model = DSNet(args.variant, base.num_classes, aux_heads=True).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                          weight_decay=args.weight_decay)
    os.makedirs(args.out, exist_ok=True)
    ckpt = os.path.join(args.out, 'checkpoint.pth.tar')
    start, best = 0, 0.0
    if args.resume and os.path.exists(ckpt):
        blob = torch.load(ckpt, map_location='cpu', weights_only=False)
        model.load_state_dict(load_official_state_dict(ckpt, keep_aux=True))
        if blob.get('optimizer'):
            opt.load_state_dict(blob['optimizer'])
        start, best = int(blob['epoch']), float(blob['best_mIoU'])
        print(f'resumed from {ckpt} at iteration {start}')
    data = AugmentedDataset(base, (args.crop_height, args.crop_width), seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0)
    use_amp = device.startswith('cuda')
    it, t0 = start, time.time()
    bar = tqdm(total=args.iterations, initial=start, desc='dsnet-train', unit='it')
    log = open(os.path.join(args.out, 'train_log.jsonl'), 'a')
    while it < args.iterations:
        model.train()
        for x, y in loader:
            if it >= args.iterations or (args.time_limit and time.time() - t0 > args.time_limit):
                break
            # Poly decay over whichever budget (iterations or time) runs out first.
            progress = it / args.iterations
            if args.time_limit:
                progress = max(progress, (time.time() - t0) / args.time_limit)
            lr = args.lr * (1 - min(progress, 1.0)) ** 0.9
            for g in opt.param_groups:
                g['lr'] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast('cuda', dtype=torch.bfloat16, enabled=use_amp):
                out = model(x)
            loss = dsnet_loss([o.float() for o in out], y, min_kept=args.min_kept)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            it += 1
            bar.update(1)
            bar.set_postfix(loss=f'{loss.item():.3f}', lr=f'{lr:.4f}')
            if it % 50 == 0:
                log.write(json.dumps({'it': it, 'loss': loss.item(), 'lr': lr,
                                      'time': time.time() - t0}) + '\n')
                log.flush()
            if it % args.checkpoint_every == 0:
                save_official(ckpt, model, opt, it, best)
        data.epoch += 1
        if args.time_limit and time.time() - t0 > args.time_limit:
            print(f'time limit reached at iteration {it}')
            break
    bar.close()
    conf = evaluate_torch(model, val, (args.height, args.width), base.num_classes, device)
    miou = mean_iou(conf)
    best = max(best, miou)
    save_official(ckpt, model, opt, it, best)
    report = format_report(conf, [str(i) for i in range(base.num_classes)])
    print(report)
    with open(os.path.join(args.out, 'train_summary.json'), 'w') as f:
        json.dump({'iterations': it, 'val_mIoU': miou, 'seconds': time.time() - t0,
                   'variant': args.variant, 'dataset': args.dataset, 'device': device,
                   'batch_size': args.batch_size, 'crop': [args.crop_height, args.crop_width],
                   'lr': args.lr}, f, indent=2)
    return 0


def add_arguments(p):
    p.add_argument('--variant', default='dsnet_tiny')
    p.add_argument('--dataset', default='synthetic',
                   choices=['synthetic', 'cityscapes', 'ade20k'])
    p.add_argument('--data-root', help='dataset folder (cityscapes / ade20k)')
    p.add_argument('--out', default='runs/dsnet', help='checkpoint/log folder')
    p.add_argument('--iterations', type=int, default=20000)
    p.add_argument('--time-limit', type=float, default=0, help='stop after N seconds')
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--lr', type=float, default=0.01)
    p.add_argument('--weight-decay', type=float, default=5e-4)
    p.add_argument('--min-kept', type=int, default=131072)
    p.add_argument('--height', type=int, default=480, help='render / eval height')
    p.add_argument('--width', type=int, default=640)
    p.add_argument('--crop-height', type=int, default=384)
    p.add_argument('--crop-width', type=int, default=512)
    p.add_argument('--train-size', type=int, default=100000, help='synthetic scenes')
    p.add_argument('--val-size', type=int, default=100)
    p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument('--checkpoint-every', type=int, default=500)
    p.add_argument('--device', default=None)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--resume', action='store_true')


def run(args):
    return train(args)
