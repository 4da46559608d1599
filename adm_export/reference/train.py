"""Training recipe of the reference text-to-audio model (``reference-audioldm``).

Stages (each a function that trains until its deadline and saves what it has):

1. data: the procedural corpus (:mod:`adm_export.reference.corpus`, seed 0) rendered by CPU worker
   processes into one float16 array, plus a held-out set (seed 1).
2. vae: ``AutoencoderKL`` on AudioLDM log-mel (1 x T x 64 -> 8 x T/4 x 16), L1 + small KL.
3. clap: ``ClapTextModelWithProjection`` (byte tokenizer) and a CNN audio encoder trained
   contrastively (symmetric InfoNCE, identical captions count as positives) with attribute heads
   on both towers (class, pitch, loudness, duration, rhythm, environment, layer).
4. unet: ``UNet2DConditionModel`` (AudioLDM's class-label FiLM conditioning by the L2-normalised
   text embedding), epsilon prediction on scaled VAE latents, AudioLDM's betas, 10 % of the
   conditions replaced by the empty caption's embedding (classifier-free guidance), EMA weights.
5. vocoder: ``SpeechT5HifiGan`` on ground-truth mels, log-mel L1 + multi-resolution STFT losses
   (no discriminator).

The vae, clap and vocoder stages do not depend on each other and run as concurrent processes on
the one GPU (small models leave it mostly idle); unet starts when vae and clap are done. All seeds
are fixed; the stop points are wall-clock deadlines, so step counts (logged) vary with the card.

Run through ``benchmarks/train_reference.py``. Over 500 lines on purpose: the whole recipe in one
file, read top to bottom as a record of how the shipped weights were made (GPU tooling that no
runtime module imports).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from adm_export.models import reference_components as C
from adm_export.reference import corpus as corpus_mod

logger = logging.getLogger(__name__)

STAGES = ("vae", "clap", "unet", "vocoder")


def _log(stage: str, msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: {msg}", flush=True)


# -- 1. data -----------------------------------------------------------------------------------
def _render(args):
    i, seed, seconds = args
    spec = corpus_mod.sample_spec(np.random.default_rng([seed, i, corpus_mod.GENERATOR_VERSION]))
    audio = corpus_mod.synthesize(spec, seconds)
    return i, audio.astype(np.float16), spec.caption(), corpus_mod.label_vector(spec)


def make_data(work: Path, n_train: int, n_eval: int, seconds: float, workers: int) -> dict:
    """Render the training (seed 0) and held-out (seed 1) corpora into ``work/data``."""
    import multiprocessing as mp

    out = work / "data"
    out.mkdir(parents=True, exist_ok=True)
    info = {}
    for name, seed, n in (("train", 0, n_train), ("eval", 1, n_eval)):
        t0 = time.time()
        samples = int(round(seconds * C.SAMPLING_RATE))
        waves = np.lib.format.open_memmap(out / f"{name}_wave.npy", mode="w+", dtype=np.float16, shape=(n, samples))
        captions, labels = [None] * n, [None] * n
        with mp.get_context("fork").Pool(workers) as pool:
            for i, audio, cap, lab in pool.imap_unordered(_render, [(i, seed, seconds) for i in range(n)], chunksize=32):
                waves[i] = audio
                captions[i], labels[i] = cap, lab
        waves.flush()
        del waves
        (out / f"{name}_meta.json").write_text(json.dumps({"captions": captions, "labels": labels, "seed": seed}))
        info[name] = {"clips": n, "seed": seed, "seconds": seconds, "unique_captions": len(set(captions)),
                      "render_s": round(time.time() - t0, 1)}
        _log("data", f"{name}: {n} clips, {len(set(captions))} unique captions, {time.time() - t0:.1f} s")
    train_caps = set(json.loads((out / "train_meta.json").read_text())["captions"])
    eval_caps = json.loads((out / "eval_meta.json").read_text())["captions"]
    info["eval"]["captions_unseen_in_train"] = sum(c not in train_caps for c in eval_caps) / max(1, len(eval_caps))
    return info


class _Data:
    """The rendered corpus on the training device: waveforms, log-mels, captions, labels."""

    def __init__(self, work: Path, name: str, device):
        import torch

        d = work / "data"
        meta = json.loads((d / f"{name}_meta.json").read_text())
        self.captions = meta["captions"]
        self.labels = torch.tensor(meta["labels"], device=device)
        self.wave = torch.from_numpy(np.array(np.load(d / f"{name}_wave.npy", mmap_mode="r"))).to(device)
        mels = [C.log_mel(self.wave[s:s + 256]) for s in range(0, self.wave.shape[0], 256)]
        self.mel = torch.cat(mels)  # (N, T, 64) float32
        uniq = sorted(set(self.captions))
        self.unique_captions = uniq
        index = {c: i for i, c in enumerate(uniq)}
        self.caption_id = torch.tensor([index[c] for c in self.captions], device=device)

    def __len__(self):
        return self.wave.shape[0]


def _init_dir() -> Path | None:
    """Result folder of an earlier run to continue from (``REFERENCE_INIT``), or None."""
    v = os.environ.get("REFERENCE_INIT")
    return Path(v) if v else None


def _lr_factor(step: int, frac: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay over the stage's wall-clock budget (to 10 %)."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac))))


class _Clock:
    def __init__(self, deadline: float, max_steps: int):
        self.t0, self.deadline, self.max_steps = time.time(), deadline, max_steps

    def frac(self, step: int) -> float:
        return max((time.time() - self.t0) / max(1e-6, self.deadline - self.t0), step / self.max_steps)

    def running(self, step: int) -> bool:
        return step < self.max_steps and time.time() < self.deadline


def _autocast(device):
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _write_log(work: Path, stage: str, log: dict) -> None:
    (work / stage).mkdir(parents=True, exist_ok=True)
    (work / stage / "log.json").write_text(json.dumps(log, indent=1))


# -- 2. VAE ------------------------------------------------------------------------------------
def train_vae(work: Path, deadline: float, device, max_steps: int, batch: int = 64) -> None:
    import torch

    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    init = _init_dir()
    if init is not None:
        # Continued run: the U-Net's latents must keep their scale, so the VAE is taken as it is.
        vae = AutoencoderKL.from_pretrained(init / "audioldm" / "vae", dtype=torch.float32)
        vae.save_pretrained(work / "vae" / "model")
        _write_log(work, "vae", {"steps": 0, "seconds": 0.0, "init": str(init),
                                 "scaling_factor": float(vae.config.scaling_factor), "history": []})
        _log("vae", f"kept from {init} (scaling_factor {vae.config.scaling_factor:.4f})")
        return
    data = _Data(work, "train", device)
    vae = C.build_vae(seed=1).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=4e-4, weight_decay=0.0)
    g = torch.Generator(device=device).manual_seed(1)
    clock, step, hist = _Clock(deadline, max_steps), 0, []
    while clock.running(step):
        for pg in opt.param_groups:
            pg["lr"] = 4e-4 * _lr_factor(step, clock.frac(step))
        idx = torch.randint(0, len(data), (batch,), device=device, generator=g)
        x = data.mel[idx][:, None]
        with _autocast(device):
            post = vae.encode(x).latent_dist
            z = post.sample(generator=g)
            rec = vae.decode(z).sample
        l1 = (rec.float() - x).abs().mean()
        kl = post.kl().mean() / x[0].numel()
        loss = l1 + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            hist.append({"step": step, "t": round(time.time() - clock.t0, 1), "l1": l1.item(), "kl": kl.item()})
        if step % 500 == 0:
            _log("vae", f"step {step} l1 {float(l1):.4f} kl/elem {float(kl):.4f}")
        step += 1
    vae.eval()
    # Latent scale: 1 / std of posterior samples, as Stable Diffusion / AudioLDM set scaling_factor.
    with torch.no_grad(), _autocast(device):
        zs = torch.cat([vae.encode(data.mel[s:s + 64][:, None]).latent_dist.sample(generator=g).float()
                        for s in range(0, min(len(data), 1024), 64)])
        rec = vae.decode(vae.encode(data.mel[:64][:, None]).latent_dist.mode()).sample.float()
    scale = float(1.0 / zs.std())
    vae.register_to_config(scaling_factor=scale)
    final_l1 = float((rec[:, 0] - data.mel[:64]).abs().mean())
    vae.float().save_pretrained(work / "vae" / "model")
    _write_log(work, "vae", {"steps": step, "seconds": round(time.time() - clock.t0, 1), "batch": batch,
                             "scaling_factor": scale, "recon_l1_first64_train": final_l1, "history": hist})
    _log("vae", f"done: {step} steps, recon L1 {final_l1:.4f}, scaling_factor {scale:.4f}")


# -- 3. CLAP-style pair ------------------------------------------------------------------------
def tokenizer():
    """The byte-level RoBERTa tokenizer of ``tiny-audioldm`` (256 positions: whole captions)."""
    from adm_export.models.embedded import build_byte_tokenizer

    return build_byte_tokenizer(model_max_length=256)


def _tokenize(tok, captions, device):
    enc = tok(list(captions), padding="longest", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt")
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def _spec_augment(mel, g):
    import torch

    b, t, f = mel.shape
    dev = mel.device
    gain = (torch.rand(b, 1, 1, device=dev, generator=g) - 0.5) * 0.6  # +-0.3 in log: +-35 % level
    mel = torch.clamp(mel + gain, min=math.log(C.LOG_FLOOR))
    mel = mel + 0.1 * torch.randn(mel.shape, device=dev, generator=g)
    t0 = (torch.rand(b, 1, device=dev, generator=g) * t).long()
    tw = (torch.rand(b, 1, device=dev, generator=g) * 0.1 * t).long()
    f0 = (torch.rand(b, 1, device=dev, generator=g) * f).long()
    fw = (torch.rand(b, 1, device=dev, generator=g) * 6).long()
    ti = torch.arange(t, device=dev)[None]
    fi = torch.arange(f, device=dev)[None]
    tmask = ((ti >= t0) & (ti < t0 + tw))[:, :, None]
    fmask = ((fi >= f0) & (fi < f0 + fw))[:, None, :]
    return mel.masked_fill(tmask | fmask, math.log(C.LOG_FLOOR))


def train_clap(work: Path, deadline: float, device, max_steps: int, batch: int = 256) -> None:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(2)
    data = _Data(work, "train", device)
    tok = tokenizer()
    ids, mask = _tokenize(tok, data.unique_captions, device)
    text = C.build_text_encoder(len(tok), tok.model_max_length, seed=2)
    audio = C.build_audio_encoder(seed=3)
    init, vocoder, lr = _init_dir(), None, 5e-4
    if init is not None:
        from safetensors.torch import load_file
        from transformers import ClapTextModelWithProjection, SpeechT5HifiGan

        text = ClapTextModelWithProjection.from_pretrained(init / "audioldm" / "text_encoder", dtype=torch.float32)
        audio.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in load_file(str(init / "reference_clap.safetensors")).items()})
        # The earlier run's vocoder resynthesises half of the audio tower's inputs, so the
        # embedder's class head ignores vocoder artefacts (labels stay the true ones).
        vocoder = SpeechT5HifiGan.from_pretrained(init / "audioldm" / "vocoder", dtype=torch.float32)
        vocoder = vocoder.to(device).eval().requires_grad_(False)
        lr = 3e-4
    text, audio = text.to(device).train(), audio.to(device).train()
    pdim = C.TEXT_CONFIG["projection_dim"]
    text_heads = torch.nn.ModuleDict({k: torch.nn.Linear(pdim, n) for k, n in C.HEADS.items()}).to(device)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    params = [*text.parameters(), *audio.parameters(), *text_heads.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    g = torch.Generator(device=device).manual_seed(2)
    heads = list(C.HEADS)
    clock, step, hist = _Clock(deadline, max_steps), 0, []
    while clock.running(step):
        for pg in opt.param_groups:
            pg["lr"] = lr * _lr_factor(step, clock.frac(step), warmup=200 if init is None else 50)
        idx = torch.randint(0, len(data), (batch,), device=device, generator=g)
        cid = data.caption_id[idx]
        mel_in = data.mel[idx]
        if vocoder is not None:
            half = batch // 2
            with torch.no_grad(), _autocast(device):
                y = vocoder(mel_in[:half]).float()[:, : data.wave.shape[1]]
            mel_in = torch.cat([C.log_mel(y)[:, : mel_in.shape[1]], mel_in[half:]])
        width = int(mask[cid].sum(1).max())
        labels = data.labels[idx]
        with _autocast(device):
            t_emb = text(input_ids=ids[cid, :width], attention_mask=mask[cid, :width]).text_embeds.float()
            a_emb, a_proj, a_logits = audio(_spec_augment(mel_in, g))
        t_n, a_n = F.normalize(t_emb, dim=-1), F.normalize(a_proj.float(), dim=-1)
        sim = logit_scale.clamp(max=math.log(100)).exp() * a_n @ t_n.T
        pos = (cid[:, None] == cid[None, :]).float()
        target = pos / pos.sum(1, keepdim=True)
        contrastive = 0.5 * (-(target * sim.log_softmax(1)).sum(1).mean() - (target * sim.T.log_softmax(1)).sum(1).mean())
        ce_a = sum(F.cross_entropy(a_logits[k].float(), labels[:, j]) for j, k in enumerate(heads))
        ce_t = sum(F.cross_entropy(text_heads[k](t_n * 8.0), labels[:, j]) for j, k in enumerate(heads))
        loss = contrastive + 0.5 * (ce_a + ce_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0:
            acc_a = float((a_logits["class"].argmax(1) == labels[:, 0]).float().mean())
            acc_t = float((text_heads["class"](t_n * 8.0).argmax(1) == labels[:, 0]).float().mean())
            hist.append({"step": step, "t": round(time.time() - clock.t0, 1), "contrastive": contrastive.item(),
                         "ce_audio": ce_a.item(), "ce_text": ce_t.item(), "class_acc_audio": acc_a,
                         "class_acc_text": acc_t})
        if step % 500 == 0:
            _log("clap", f"step {step} contrastive {contrastive.item():.3f} ce_audio {float(ce_a):.3f} "
                         f"ce_text {float(ce_t):.3f}")
        step += 1
    text.eval()
    audio.eval()
    ev = _Data(work, "eval", device)
    with torch.no_grad():
        pred = torch.cat([audio(ev.mel[s:s + 256])[2]["class"].argmax(1) for s in range(0, len(ev), 256)])
        acc = float((pred == ev.labels[:, 0]).float().mean())
    (work / "clap").mkdir(parents=True, exist_ok=True)
    text.save_pretrained(work / "clap" / "text_encoder")
    torch.save(audio.state_dict(), work / "clap" / "audio_encoder.pt")
    _write_log(work, "clap", {"steps": step, "seconds": round(time.time() - clock.t0, 1), "batch": batch,
                              "heldout_class_acc_audio_real": acc, "history": hist})
    _log("clap", f"done: {step} steps, held-out real-clip class accuracy {acc:.3f}")


# -- 4. U-Net ----------------------------------------------------------------------------------
def text_embeddings(text_encoder, tok, captions, device, batch: int = 512):
    """L2-normalised ``text_embeds`` exactly as ``AudioLDMPipeline._encode_prompt`` makes them."""
    import torch
    import torch.nn.functional as F

    out = []
    with torch.no_grad():
        for s in range(0, len(captions), batch):
            enc = tok(list(captions[s:s + batch]), padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt")
            e = text_encoder(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device)).text_embeds
            out.append(F.normalize(e.float(), dim=-1))
    return torch.cat(out)


def train_unet(work: Path, deadline: float, device, max_steps: int, batch: int = 128) -> None:
    import copy

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import ClapTextModelWithProjection

    torch.manual_seed(4)
    data = _Data(work, "train", device)
    vae = AutoencoderKL.from_pretrained(work / "vae" / "model").to(device).eval()
    tok = tokenizer()
    text = ClapTextModelWithProjection.from_pretrained(work / "clap" / "text_encoder").to(device).eval()
    cond = text_embeddings(text, tok, data.unique_captions, device)
    uncond = text_embeddings(text, tok, [""], device)[0]
    del text
    with torch.no_grad():
        mean, std = [], []
        for s in range(0, len(data), 128):
            post = vae.encode(data.mel[s:s + 128][:, None]).latent_dist
            mean.append(post.mean.half())
            std.append(post.std.half())
        mean, std = torch.cat(mean), torch.cat(std)
    sf = float(vae.config.scaling_factor)
    del vae
    sched = DDPMScheduler(**{k: v for k, v in C.SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one", "steps_offset")})
    acp = sched.alphas_cumprod.to(device)
    init, lr, warmup = _init_dir(), 4e-4, 300
    if init is not None:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(init / "audioldm" / "unet", dtype=torch.float32)
        lr, warmup = 2.5e-4, 50
    else:
        unet = C.build_unet(seed=4)
    unet = unet.to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator(device=device).manual_seed(4)
    clock, step, hist = _Clock(deadline, max_steps), 0, []
    while clock.running(step):
        for pg in opt.param_groups:
            pg["lr"] = lr * _lr_factor(step, clock.frac(step), warmup=warmup)
        idx = torch.randint(0, len(data), (batch,), device=device, generator=g)
        z0 = (mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, device=device, generator=g)) * sf
        c = cond[data.caption_id[idx]]
        drop = torch.rand(batch, device=device, generator=g) < 0.1
        c = torch.where(drop[:, None], uncond[None], c)
        t = torch.randint(0, 1000, (batch,), device=device, generator=g)
        noise = torch.randn(z0.shape, device=device, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with _autocast(device):
            pred = unet(zt, t, encoder_hidden_states=None, class_labels=c).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 50 == 0:
            hist.append({"step": step, "t": round(time.time() - clock.t0, 1), "mse": loss.item()})
        if step % 1000 == 0:
            _log("unet", f"step {step} eps-mse {float(loss):.4f}")
        step += 1
    ema.save_pretrained(work / "unet" / "model")
    tail = [h["mse"] for h in hist[-20:]]
    _write_log(work, "unet", {"steps": step, "seconds": round(time.time() - clock.t0, 1), "batch": batch,
                              "cfg_dropout": 0.1, "ema_decay": 0.999, "prediction": "epsilon",
                              "final_mse_mean_last20": float(np.mean(tail)) if tail else None, "history": hist})
    _log("unet", f"done: {step} steps, eps-mse (last logged) {np.mean(tail) if tail else float('nan'):.4f}")


# -- 5. vocoder --------------------------------------------------------------------------------
def _stft_mag(x, n_fft, hop):
    import torch

    w = torch.hann_window(n_fft, device=x.device)
    return torch.stft(x, n_fft, hop, n_fft, window=w, return_complex=True).abs().clamp(min=1e-7)


def mr_stft_loss(y, x):
    """Multi-resolution STFT loss (spectral convergence + log-magnitude L1), Parallel WaveGAN style."""
    total = 0.0
    for n_fft, hop in ((256, 64), (512, 128), (1024, 256), (2048, 512)):
        sy, sx = _stft_mag(y, n_fft, hop), _stft_mag(x, n_fft, hop)
        sc = (sy - sx).norm() / sx.norm()
        total = total + sc + (sy.log() - sx.log()).abs().mean()
    return total / 4


def train_vocoder(work: Path, deadline: float, device, max_steps: int, batch: int = 32, frames: int = 64) -> None:
    import torch

    torch.manual_seed(5)
    data = _Data(work, "train", device)
    init, lr = _init_dir(), 5e-4
    if init is not None:
        from transformers import SpeechT5HifiGan

        voc, lr = SpeechT5HifiGan.from_pretrained(init / "audioldm" / "vocoder", dtype=torch.float32), 3e-4
        if "vocoder" in os.environ.get("REFERENCE_KEEP", "").split(","):
            # Kept as it is: the GPU goes to the U-Net and the CLAP pair.
            voc.save_pretrained(work / "vocoder" / "model")
            _write_log(work, "vocoder", {"steps": 0, "seconds": 0.0, "init": str(init), "history": []})
            _log("vocoder", f"kept from {init}")
            return
    else:
        voc = C.build_vocoder(seed=5)
    voc = voc.to(device).train()
    opt = torch.optim.AdamW(voc.parameters(), lr=lr, betas=(0.8, 0.99))
    g = torch.Generator(device=device).manual_seed(5)
    n_frames = data.mel.shape[1]
    frames = min(frames, n_frames)
    clock, step, hist = _Clock(deadline, max_steps), 0, []
    while clock.running(step):
        for pg in opt.param_groups:
            pg["lr"] = lr * _lr_factor(step, clock.frac(step), warmup=200 if init is None else 50)
        idx = torch.randint(0, len(data), (batch,), device=device, generator=g)
        f0 = torch.randint(0, n_frames - frames + 1, (batch,), device=device, generator=g)
        fi = f0[:, None] + torch.arange(frames, device=device)[None]
        mel = data.mel[idx[:, None], fi]
        si = f0[:, None] * C.HOP + torch.arange(frames * C.HOP, device=device)[None]
        target = data.wave[idx[:, None], si].float()
        with _autocast(device):
            y = voc(mel)
        y = y.float()[:, : target.shape[1]]
        mel_l1 = (C.log_mel(y) - C.log_mel(target)).abs().mean()
        stft = mr_stft_loss(y, target)
        loss = mel_l1 + 2.0 * stft
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(voc.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            hist.append({"step": step, "t": round(time.time() - clock.t0, 1), "mel_l1": mel_l1.item(),
                         "mr_stft": stft.item()})
        if step % 500 == 0:
            _log("vocoder", f"step {step} mel-L1 {float(mel_l1):.4f} mr-stft {float(stft):.4f}")
        step += 1
    voc.eval()
    voc.save_pretrained(work / "vocoder" / "model")
    _write_log(work, "vocoder", {"steps": step, "seconds": round(time.time() - clock.t0, 1), "batch": batch,
                                 "segment_frames": frames, "history": hist})
    _log("vocoder", f"done: {step} steps, mel-L1 {hist[-1]['mel_l1'] if hist else float('nan'):.4f}")


# -- assembly ----------------------------------------------------------------------------------
def assemble(work: Path, out: Path, config: dict, data_info: dict) -> dict:
    """Write the diffusers ``AudioLDMPipeline`` folder (FP16 safetensors), the embedder file,
    the training log, the config and the card into ``out``."""
    import torch
    from diffusers import AudioLDMPipeline, AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import ClapTextModelWithProjection, SpeechT5HifiGan

    from adm_export.models.embedded import _quiet_diffusers

    with _quiet_diffusers():
        pipe = AudioLDMPipeline(
            vae=AutoencoderKL.from_pretrained(work / "vae" / "model"),
            text_encoder=ClapTextModelWithProjection.from_pretrained(work / "clap" / "text_encoder"),
            tokenizer=tokenizer(),
            unet=UNet2DConditionModel.from_pretrained(work / "unet" / "model"),
            scheduler=DDIMScheduler(**C.SCHEDULER_CONFIG),
            vocoder=SpeechT5HifiGan.from_pretrained(work / "vocoder" / "model"),
        )
    pipe.to(torch.float16)
    folder = out / "audioldm"
    pipe.save_pretrained(folder, safe_serialization=True)
    sd = torch.load(work / "clap" / "audio_encoder.pt", map_location="cpu")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, str(out / "reference_clap.safetensors"),
              metadata={"generator_version": str(corpus_mod.GENERATOR_VERSION)})
    (out / "reference_clap.json").write_text(json.dumps({
        "architecture": "adm_export.models.reference_components.build_audio_encoder", "config": C.AUDIO_ENCODER_CONFIG,
        "heads": C.HEADS, "classes": list(corpus_mod.CLASSES), "sampling_rate": C.SAMPLING_RATE,
        "mel": {"n_fft": C.N_FFT, "hop": C.HOP, "mel_bins": C.MEL_BINS, "fmin": C.FMIN, "fmax": C.FMAX,
                "log_floor": C.LOG_FLOOR}}, indent=1))
    logs = {s: json.loads((work / s / "log.json").read_text()) for s in STAGES if (work / s / "log.json").exists()}
    (out / "training_log.json").write_text(json.dumps({"data": data_info, "stages": logs}, indent=1))
    cfg = dict(config, generator_version=corpus_mod.GENERATOR_VERSION, text=C.TEXT_CONFIG, vae=C.VAE_CONFIG,
               unet=C.unet_config(), vocoder=C.VOCODER_CONFIG, audio_encoder=C.AUDIO_ENCODER_CONFIG,
               scheduler=C.SCHEDULER_CONFIG)
    (out / "config.json").write_text(json.dumps(cfg, indent=1, default=list))
    (out / "GENERATOR_VERSION").write_text(f"{corpus_mod.GENERATOR_VERSION}\n")
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*.safetensors"))}
    params = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("unet", "vae", "text_encoder", "vocoder")}
    params["audio_encoder"] = sum(v.numel() for k, v in sd.items() if v.is_floating_point() and "running" not in k)
    return {"sizes_bytes": sizes, "params": params}


def quick_eval(out: Path, work: Path, device, n: int, steps: int = 10, guidance: float = 2.5) -> dict:
    """Generate held-out captions with the saved pipeline; embedder class accuracy and FD."""
    import torch
    from diffusers import AudioLDMPipeline

    from adm_export.eval.embedders.reference_clap import ReferenceClapEmbedder, frechet_distance

    pipe = AudioLDMPipeline.from_pretrained(out / "audioldm", dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    emb = ReferenceClapEmbedder(out, device=str(device))
    meta = json.loads((work / "data" / "eval_meta.json").read_text())
    caps, labels = meta["captions"][:n], np.array(meta["labels"][:n])
    real = np.load(work / "data" / "eval_wave.npy", mmap_mode="r")[:n].astype(np.float32)
    gen = []
    t0 = time.time()
    for s in range(0, n, 50):
        gens = torch.Generator(device=device).manual_seed(1000 + s)
        a = pipe(caps[s:s + 50], num_inference_steps=steps, guidance_scale=guidance, audio_length_in_s=2.56,
                 generator=gens).audios
        gen.extend(list(a))
    gen_s = time.time() - t0
    # The autoencoder path alone (real audio -> mel -> VAE -> vocoder): the ceiling of generation.
    with torch.no_grad():
        w = torch.from_numpy(real).to(device)
        mel = C.log_mel(w)[:, None]
        rec = pipe.vae.decode(pipe.vae.encode(mel).latent_dist.mode()).sample[:, 0]
        resynth = list(pipe.vocoder(rec).float().cpu().numpy()[:, : real.shape[1]])
        vocoded = list(pipe.vocoder(mel[:, 0]).float().cpu().numpy()[:, : real.shape[1]])
    e_gen, l_gen = emb.embed_and_logits(gen, C.SAMPLING_RATE)
    e_real, l_real = emb.embed_and_logits(list(real), C.SAMPLING_RATE)
    res = {
        "clips": n, "steps": steps, "guidance_scale": guidance, "generate_seconds": round(gen_s, 1),
        "class_acc_generated": float((l_gen.argmax(1) == labels[:, 0]).mean()),
        "class_acc_real": float((l_real.argmax(1) == labels[:, 0]).mean()),
        "class_acc_vocoded_real_mel": float((emb.logits(vocoded, C.SAMPLING_RATE).argmax(1) == labels[:, 0]).mean()),
        "class_acc_vae_vocoder_resynth": float((emb.logits(resynth, C.SAMPLING_RATE).argmax(1) == labels[:, 0]).mean()),
        "fd_vae_vocoder_resynth_vs_real": frechet_distance(emb.embed(resynth, C.SAMPLING_RATE), e_real),
        "fd_generated_vs_real": frechet_distance(e_gen, e_real),
        "fd_real_half_vs_half": frechet_distance(e_real[: n // 2], e_real[n // 2:]),
    }
    _log("eval", json.dumps(res))
    return res


# -- orchestration -----------------------------------------------------------------------------
def _stage_main(stage: str, work: Path, deadline: float, max_steps: int, device_name: str) -> None:
    import torch

    device = torch.device(device_name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    fn = {"vae": train_vae, "clap": train_clap, "unet": train_unet, "vocoder": train_vocoder}[stage]
    fn(work, deadline, device, max_steps)


def run(out: Path, work: Path, time_budget: float, n_train: int, n_eval: int, seconds: float, device: str,
        max_steps: int, workers: int, eval_clips: int, phase_a_frac: float = 0.3, init: Path | None = None,
        keep: tuple[str, ...] = ()) -> dict:
    """Train every stage within ``time_budget`` seconds (wall clock, from now) and assemble ``out``.

    Returns:
        The summary written to ``out/training_log.json`` plus sizes and the quick evaluation.
    """
    t0 = time.time()
    reserve = 25.0 + 0.05 * eval_clips  # assembly and the quick evaluation after training (H100: 16 s for 200)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    data_info = make_data(work, n_train, n_eval, seconds, workers)
    left = time_budget - (time.time() - t0) - reserve
    deadline_a = time.time() + phase_a_frac * left
    deadline_end = time.time() + left

    def launch(stage, deadline):
        cmd = [sys.executable, "-m", "adm_export.reference.train", "--stage", stage, "--work", str(work),
               "--deadline", str(deadline), "--max-steps", str(max_steps), "--device", device]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if init is not None:
            env["REFERENCE_INIT"] = str(Path(init).resolve())
            env["REFERENCE_KEEP"] = ",".join(keep)
        return subprocess.Popen(cmd, env=env)

    procs = {"vocoder": launch("vocoder", deadline_end), "vae": launch("vae", deadline_a),
             "clap": launch("clap", deadline_a)}
    for s in ("vae", "clap"):
        if procs[s].wait() != 0:
            raise RuntimeError(f"stage {s} failed")
    procs["unet"] = launch("unet", deadline_end)
    for s in ("unet", "vocoder"):
        if procs[s].wait() != 0:
            raise RuntimeError(f"stage {s} failed")
    config = {"time_budget_s": time_budget, "n_train": n_train, "n_eval": n_eval, "seconds": seconds,
              "device": device, "max_steps": max_steps, "init": None if init is None else str(init), "kept": list(keep), "seeds": {"data_train": 0, "data_eval": 1, "vae": 1,
              "text": 2, "audio": 3, "unet": 4, "vocoder": 5}}
    summary = assemble(work, out, config, data_info)
    import torch

    summary["quick_eval"] = quick_eval(out, work, torch.device(device), eval_clips) if eval_clips else None
    summary["total_seconds"] = round(time.time() - t0, 1)
    if device.startswith("cuda"):
        summary["device_name"] = torch.cuda.get_device_name(0)
    log = json.loads((out / "training_log.json").read_text())
    log.update(summary)
    if init is not None and (Path(init) / "training_log.json").exists():
        # A continued run keeps the earlier run's log: together they are the model's history.
        log["continued_from"] = json.loads((Path(init) / "training_log.json").read_text())
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    _log("done", json.dumps({k: v for k, v in summary.items() if k != "quick_eval"}))
    return summary


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--deadline", type=float, required=True)
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--device", default="cuda")
    a = p.parse_args(argv)
    _stage_main(a.stage, a.work, a.deadline, a.max_steps, a.device)


if __name__ == "__main__":
    main()
