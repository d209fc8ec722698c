"""``--data_pipeline gpu``: decode, random-resized-crop, flip and normalise on the device.

DataLoader workers only hand over raw images: the file bytes of an ImageFolder (JPEG decoding
is the CPU path's bottleneck) or the uint8 arrays of Fashion-MNIST. The training loop then calls
:class:`GpuAugment` on each batch, on the device Accelerate gives the run (the CPU without one):

- crop boxes follow torchvision's ``RandomResizedCrop.get_params`` exactly (scale
  ``(crop_min, 1)``, ratio ``(3/4, 4/3)``, 10 attempts, then the centre-crop fallback),
  vectorised over the batch; flips have p = 0.5. Both are drawn from a CPU generator seeded by
  (seed, rank, epoch, batch index), so a resumed run draws the same crops;
- same-size uint8 batches (Fashion-MNIST) are resampled in one ``grid_sample`` (bicubic) whose
  sampling points are those of resizing each crop box to the output size (images larger than
  the output go through the per-image antialiased path below instead);
- encoded files are decoded with ``torchvision.io.decode_jpeg`` (batched on CUDA), then each
  image is cropped and resized with antialiased bicubic resampling: on CUDA all crops of a
  batch at once (:func:`maepl.resample.resized_crops`, two batched products with the weights
  of torch's antialiased ``interpolate``), on a CPU one ``interpolate`` per image. Only JPEGs
  that nvJPEG decodes as torchvision calls it go to the batched decode
  (:func:`maepl.encoded.nvjpeg_decodable`: CMYK, 12-bit, arithmetic-coded and lossless JPEGs do
  not); the others, and files the batched decode rejects, are decoded one by one
  (``decode_image``, then PIL); files that still fail are replaced in their batch by the
  batch's first readable image and reported, as in the CPU path.

On CUDA the decoded pixels are not libjpeg-turbo's: torchvision creates nvJPEG with its default
flags, which upsample subsampled chroma (4:2:0, 4:2:2) by repetition where libjpeg-turbo (the CPU
path, through PIL) interpolates. Luma is the same to within the IDCT's rounding; colour edges
differ by a few steps of 255 (measured in docs/performance.md). Crops, flips, resampling and
normalisation are the CPU path's given the same decoded image (tested on CUDA).

Resampled values are clamped to [0, 255] and rounded, like the uint8 images the CPU path's PIL
transform produces, before ``/255`` and the dataset's mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .encoded import EncodedBatch, decode_batch
from .loaders import BadImageError, chain_seed
from .resample import resized_crop_batch, resized_crops, resized_crops_one_by_one, rgb_to_luma

ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params
RATIO = (3 / 4, 4 / 3)
# columns of the uniform draws per image: ATTEMPTS each of area, log-ratio, top, left; one flip
DRAWS = 4 * ATTEMPTS + 1


# ---------------------------------------------------------------------------- random parameters
def draw_uniforms(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, DRAWS]`` float64 uniforms in [0, 1) from a CPU generator."""
    return torch.rand(n, DRAWS, dtype=torch.float64, generator=generator)


def crop_boxes(
    sizes: torch.Tensor,
    u: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float] = RATIO,
) -> torch.Tensor:
    """RandomResizedCrop boxes ``[n, 4]`` (top, left, height, width) for images ``[n, 2]`` (h, w).

    torchvision's ``get_params`` for each row, given its uniform draws ``u[:, :4 * ATTEMPTS]``:
    attempt k takes area ``scale0 + (scale1 - scale0) * u`` of the image and aspect ratio
    ``exp(log_r0 + (log_r1 - log_r0) * u)``, is accepted if the rounded box fits, and is placed
    at ``floor(u * (H - h + 1)), floor(u * (W - w + 1))``; the first accepted attempt wins,
    otherwise the centre crop at the nearest allowed ratio. float64 throughout, as Python's
    arithmetic in ``get_params``; round() is half-to-even in both.
    """
    H, W = sizes[:, :1].double(), sizes[:, 1:2].double()
    u_area, u_ratio, u_top, u_left = u[:, : 4 * ATTEMPTS].double().view(-1, 4, ATTEMPTS).unbind(1)
    log_r = torch.log(torch.tensor(ratio)).double()  # float32 logs, as get_params computes them
    target = H * W * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    top = torch.floor(u_top * (H - h + 1))
    left = torch.floor(u_left * (W - w + 1))
    first = ok.int().argmax(1, keepdim=True)  # index of the first accepted attempt

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.gather(1, first)[:, 0]

    # fallback: the centre crop at the nearest ratio in range
    in_ratio = W[:, 0] / H[:, 0]
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fw = torch.where(wide, torch.round(H[:, 0] * max(ratio)), W[:, 0])
    fh = torch.where(narrow, torch.round(W[:, 0] / min(ratio)), H[:, 0])
    ftop, fleft = torch.div(H[:, 0] - fh, 2, rounding_mode="floor"), (W[:, 0] - fw) // 2
    found = ok.any(1)
    box = torch.stack(
        [
            torch.where(found, pick(top), ftop),
            torch.where(found, pick(left), fleft),
            torch.where(found, pick(h), fh),
            torch.where(found, pick(w), fw),
        ],
        1,
    )
    return box.long()


def flips(u: torch.Tensor) -> torch.Tensor:
    """Horizontal flips with p = 0.5 from the last column of the draws."""
    return u[:, -1] < 0.5


# ---------------------------------------------------------------------------- the augmentation
class GpuAugment:
    """Raw batch -> normalised float ``[n, in_chans, size, size]`` on ``device``.

    ``augment(batch, epoch, index)`` returns the images and the descriptions of the files that
    did not decode (each replaced by the batch's first readable image, as ``collate_skip_bad``
    does). The crops and flips depend only on (seed, rank, epoch, index) and the image sizes.
    """

    def __init__(
        self,
        input_size: int,
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_min: float,
        seed: int,
        rank: int,
        device: torch.device | str,
        strict: bool = False,
    ):
        if in_chans not in (1, 3) or len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"in_chans={in_chans} needs 1 or 3 channels and as many mean/std")
        self.size, self.in_chans, self.scale = input_size, in_chans, (crop_min, 1.0)
        self.seed, self.rank, self.strict = seed, rank, strict
        self.device = torch.device(device)
        # all crops of a batch in a few kernels on CUDA (see _resize); per image on a CPU
        self.batched_resize = self.device.type == "cuda"
        # (x / 255 - mean) / std on [0, 255] values
        self.shift = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.div = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255

    @classmethod
    def from_config(cls, cfg, mean, std, device: torch.device, rank: int) -> GpuAugment:
        if device.type == "cpu" and rank == 0:
            print("note: data_pipeline gpu without an accelerator decodes and crops on the CPU")
        size, chans = cfg.input_size, cfg.in_chans
        return cls(size, chans, mean, std, cfg.crop_min, cfg.seed, rank, device, cfg.strict_data)

    def params(self, sizes: torch.Tensor, epoch: int, index: int):
        """Crop boxes and flips of micro-batch ``index`` of ``epoch`` for images of ``sizes``."""
        gen = torch.Generator().manual_seed(chain_seed(self.seed, self.rank, epoch, index))
        u = draw_uniforms(len(sizes), gen)
        return crop_boxes(sizes, u, self.scale), flips(u)

    def __call__(self, batch, epoch: int, index: int) -> tuple[torch.Tensor, list[str]]:
        if isinstance(batch, EncodedBatch):
            imgs, errors = decode_batch(batch.data, self.device, batch.nvjpeg)
            bad = [f"{batch.paths[k]}: {err}" for k, err in errors.items()]
            if bad and self.strict:
                raise BadImageError(f"unreadable image {bad[0]} (strict_data)")
            x = self._crop_decoded(imgs, epoch, index, bad)
        else:
            x, bad = self._same_size(batch, epoch, index), []
        return self._normalise(x), bad

    def augment_decoded(
        self, imgs: list[torch.Tensor | None], epoch: int, index: int
    ) -> torch.Tensor:
        """What ``__call__`` does to encoded files once they are decoded: uint8 RGB images on
        the device (None where unreadable) -> the normalised batch. For comparing decoders."""
        return self._normalise(self._crop_decoded(imgs, epoch, index, []))

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp_(0, 255).round_()  # the range and steps of the CPU path's uint8 images
        if x.shape[1] != self.in_chans:  # gray -> RGB replicates, as PIL's convert("RGB")
            x = x.expand(-1, self.in_chans, -1, -1)
        return (x - self.shift) / self.div

    def _same_size(self, imgs: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        n, c, h, w = imgs.shape
        boxes, flip = self.params(torch.tensor([[h, w]]).expand(n, 2), epoch, index)
        x = imgs.to(self.device, non_blocking=True)
        if c == 3 and self.in_chans == 1:
            x = rgb_to_luma(x)
        if max(h, w) <= self.size:  # every crop is upsampled: no antialiasing needed
            return resized_crop_batch(x.float(), boxes, flip, self.size)  # boxes, flip: host
        return self._resize(list(x), boxes, flip, luma=False)

    def _crop_decoded(
        self, imgs: list[torch.Tensor | None], epoch: int, index: int, bad: list[str]
    ) -> torch.Tensor:
        good = [k for k, img in enumerate(imgs) if img is not None]
        if not good:
            raise BadImageError("every image of a batch is unreadable:\n  " + "\n  ".join(bad))
        sizes = torch.tensor([[1, 1] if img is None else list(img.shape[1:]) for img in imgs])
        boxes, flip = self.params(sizes, epoch, index)
        # an unreadable image is replaced by the first readable one: its crop and its flip
        src = [k if img is not None else good[0] for k, img in enumerate(imgs)]
        return self._resize([imgs[k] for k in src], boxes[src], flip[src], self.in_chans == 1)

    def _resize(
        self, imgs: list[torch.Tensor], boxes: torch.Tensor, flip: torch.Tensor, luma: bool
    ) -> torch.Tensor:
        """Each crop resized, then flipped. On CUDA batched (``resized_crops``): per-image
        resizing launched two kernels an image from Python, 7.8 ms of device time a ViT-B step
        on the H100 (session 9); on a CPU per image, which computes far less than the dense
        products."""
        resize = resized_crops if self.batched_resize else resized_crops_one_by_one
        return resize(imgs, boxes, flip, self.size, luma)
