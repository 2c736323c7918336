"""Diffusers priors (Stable-Diffusion-style text-to-image models) behind the :class:`Denoiser` protocol.

A prior is a directory with the subfolders ``unet/`` (UNet2DConditionModel), ``text_encoder/``
(CLIPTextModel), ``tokenizer/``, ``scheduler/`` and, for a latent model, ``vae/`` (AutoencoderKL). Each
component is loaded with its own class's ``from_pretrained(dir, subfolder=..., local_files_only=True)``,
so a pixel-space model without a VAE loads through the same code. Nothing is ever downloaded: a hub
repo id is looked up in the local Hugging Face cache only, and a missing model raises
:class:`PriorNotFoundError` at once with the command that downloads it.

Conventions (docs/design.md §3). The model is VP: ``z_t = α_t x + s_t ε``, ``α_t = √ᾱ_t``, ``s_t = √(1−ᾱ_t)``,
seen in VE coordinates through ``x̂ = z_t/α_t``, ``σ = s_t/α_t``. A view's ``eps(x̂, σ)``
feeds the UNet ``z = α x̂`` with ``α = 1/√(1+σ²)`` and the fractional DDPM timestep
``t = VPSchedule.timestep(σ)`` (log-σ interpolation between the integer timesteps of the model's own
``alphas_cumprod``; σ outside the trained range is clamped to t ∈ [0, T−1] for the timestep only).
A v-prediction output is converted with ``ε = s z + α v`` (``s = σ α``). CFG is
``ε̂ = ε̂_u + w (ε̂_c − ε̂_u)`` against the empty prompt, both halves in one UNet forward.

Prompts are conditioning, given per call: ``prior.denoiser(w)`` is the model, ``prior.conditioning(prompts)``
the :class:`~msd.denoiser.Conditioning` a guidance receives with each call (``denoiser.condition(cond)``
binds it); the denoiser's ``noise_schedule`` is the prior's own VP schedule.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from msd.denoiser import Conditioning, Denoiser, GuidedDenoiser, as_sigma, per_sample
from msd.paths import REPO_ROOT
from msd.schedules import VPSchedule

REQUIRED_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PriorNotFoundError(FileNotFoundError):
    """The prior's files are not on this machine; the message says how to get them."""


@dataclass(frozen=True)
class PriorPreset:
    """Where a named prior lives: hub repo ids looked up in the local HF cache (first found wins;
    ``repo_ids[0]`` is the one to download), or a directory relative to the repository root."""

    description: str
    repo_ids: tuple[str, ...] = ()
    local_dir: str | None = None
    train_command: str = "python -m experiments.train_shapes"
    """How this repository trains a ``local_dir`` prior (named in the not-found message)."""

    def candidates(self) -> list[str]:
        return [str(REPO_ROOT / self.local_dir)] if self.local_dir else list(self.repo_ids)

    def how_to_get(self, local_dir: str = "DIR") -> str:
        if self.local_dir:
            return (f"This repository trains it into {self.local_dir}/ (`{self.train_command}`); "
                    f"train it first or pass prior.path=<dir> to a copy.")
        return (f"Download it once, on a machine with network access:\n    {download_command(self.repo_ids[0])}\n"
                f"then run with HF_HUB_CACHE (or HF_HOME) pointing at that cache, or add `--local-dir {local_dir}` "
                f"to the command and pass prior.path={local_dir}.")


PRESETS: dict[str, PriorPreset] = {
    # The paper's model family (ProlificDreamer, threestudio's dreamfusion-sd config): ε-prediction, 512 px.
    "sd21": PriorPreset("Stable Diffusion 2.1-base", repo_ids=("stabilityai/stable-diffusion-2-1-base",)),
    # threestudio's default runwayml/stable-diffusion-v1-5 was taken down from the hub; its official mirror
    # is the id to download, and a cache that still holds the old id is used as well.
    "sd15": PriorPreset("Stable Diffusion 1.5", repo_ids=("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                                          "runwayml/stable-diffusion-v1-5")),
    # The ShapesWorld pixel-space prior this repository trains (no VAE).
    "shapes": PriorPreset("ShapesWorld pixel-space prior", local_dir="shapes/prior"),
    # The ShapesWorld-3D pixel-space prior (view-suffixed captions, Janus probes; docs/design.md §10).
    "shapes3d": PriorPreset("ShapesWorld-3D pixel-space prior", local_dir="shapes/prior3d",
                            train_command="python -m experiments.train_shapes3d"),
}


def download_command(repo_id: str) -> str:
    """``hf download`` of the diffusers component folders only (no single-file checkpoints, .bin,
    fp16/non-EMA variants or safety checker)."""
    return (f'hf download {repo_id} --include "*/*.json" --include "*/*.txt" '
            f'--include "*/*model.safetensors" --exclude "safety_checker/*"')


def get_preset(name: str) -> PriorPreset:
    if name not in PRESETS:
        raise ValueError(f"prior.name must be one of {tuple(PRESETS)}, got {name!r}")
    return PRESETS[name]


def _cached_snapshot(repo_id: str) -> Path | None:
    """The repo's snapshot folder in the local HF cache, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        return None


def _existing(source: str) -> Path | None:
    """A local directory, else a hub repo id's cached snapshot, else None."""
    directory = Path(source).expanduser()
    if directory.is_dir():
        return directory
    return _cached_snapshot(source) if _REPO_ID.match(source) else None


def locate_prior(name: str = "sd21", path: str | Path | None = None) -> Path:
    """Directory of prior ``name`` (a key of :data:`PRESETS`), or of ``path`` (a local directory or a
    hub repo id in the local cache) when given. Raises :class:`PriorNotFoundError` at once if absent."""
    preset = get_preset(name)
    sources = [str(path)] if path is not None else preset.candidates()
    directory = next((found for found in map(_existing, sources) if found is not None), None)
    if directory is None:
        from huggingface_hub.constants import HF_HUB_CACHE

        if path is not None:
            where = f"prior.path={path} is neither a local directory nor a model in the local Hugging Face cache"
        elif preset.local_dir:
            where = f"{sources[0]} does not exist"
        else:
            where = f"{' / '.join(sources)} is not in the local Hugging Face cache ({HF_HUB_CACHE})"
        raise PriorNotFoundError(f"prior {name!r} ({preset.description}): {where}; nothing is downloaded at run "
                                 f"time. {preset.how_to_get(str(path) if path is not None else 'DIR')}")
    missing = [sub for sub in REQUIRED_SUBFOLDERS if not (directory / sub).is_dir()]
    if missing:
        raise PriorNotFoundError(f"prior {name!r} at {directory} lacks the subfolder(s) {missing} (a prior needs "
                                 f"{', '.join(REQUIRED_SUBFOLDERS)}, plus vae for a latent model). "
                                 f"{preset.how_to_get()}")
    return directory


def default_device(device: torch.device | str | None) -> torch.device:
    """``device``, or CUDA when available, else the CPU."""
    return torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")


def parse_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """``None`` → float16 on CUDA, float32 elsewhere; else a torch dtype or one of :data:`DTYPES`' names."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"prior.dtype must be null or one of {tuple(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_prior(name: str = "sd21", path: str | Path | None = None, device: torch.device | str | None = None,
               dtype: torch.dtype | str | None = None) -> "DiffusersPrior":
    """Load preset ``name`` (or the model at ``path``) onto ``device`` (default: CUDA if available)."""
    return DiffusersPrior.from_pretrained(locate_prior(name, path), device=device, dtype=dtype)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class DiffusersPrior:
    """A frozen SD-style model: text embeddings, the VE ε-prediction of the UNet, encode/decode, LoRA.

    ``sample_shape`` (C, H, W) is the space the denoiser works in (VAE latents or pixels), ``image_size``
    (H, W) the decoded image size; both come from the component configs.
    """

    def __init__(self, unet, text_encoder, tokenizer, scheduler_config: dict, vae=None,
                 device: torch.device | str | None = None, dtype: torch.dtype | str | None = None):
        self.device = default_device(device)
        self.dtype = parse_dtype(dtype, self.device)
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {self.prediction_type!r}")
        self.schedule = VPSchedule.from_scheduler_config(scheduler_config)
        self.clean_range = CleanRange.from_scheduler_config(scheduler_config)
        self.unet, self.text_encoder, self.vae, self.tokenizer = unet, text_encoder, vae, tokenizer
        for module in (unet, text_encoder, vae):
            if module is not None:
                module.to(self.device)
                if module.dtype != self.dtype:
                    module.to(self.dtype)
                module.requires_grad_(False).eval()
        # channels_last (NHWC) UNet weights and inputs on the CPU: oneDNN's convolutions skip their layout
        # reorders (~5% of a forward on the ShapesWorld UNet, results equal to float32 rounding;
        # eval.bench_text2d). Other devices keep the default layout (not measured there).
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        unet.to(memory_format=self.memory_format)
        channels = unet.config.in_channels
        if vae is not None and vae.config.latent_channels != channels:
            raise ValueError(f"vae latent_channels ({vae.config.latent_channels}) != unet in_channels ({channels})")
        height, width = _pair(unet.config.sample_size)
        self.sample_shape = (channels, height, width)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_size = (height * self.vae_scale_factor, width * self.vae_scale_factor)
        self.image_channels = vae.config.in_channels if vae is not None else channels
        self.max_tokens = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
        self._embeddings: dict[str, Tensor] = {}
        self._lora: str | None = None
        self._adapters_on = False
        self.camera_embedding: nn.Module | None = None
        """The LoRA's camera embedding E_φ (``add_lora(camera_dim=...)``), or None."""
        self._call_camera: Tensor | None = None  # the camera of the UNet forward in progress (set by eps only)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str | None = None,
                        dtype: torch.dtype | str | None = None) -> "DiffusersPrior":
        """Load each component from its subfolder of ``directory`` (local files only)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        directory = Path(directory)
        missing = [sub for sub in REQUIRED_SUBFOLDERS if not (directory / sub).is_dir()]
        if missing:
            raise PriorNotFoundError(f"{directory} lacks the prior subfolder(s) {missing}")
        device = default_device(device)
        dtype = parse_dtype(dtype, device)
        load = {"local_files_only": True}
        tokenizer = AutoTokenizer.from_pretrained(directory, subfolder="tokenizer", **load)
        if len(tokenizer) <= 2:  # transformers 5 silently builds an empty CLIP tokenizer from unusable files
            raise ValueError(f"{directory / 'tokenizer'} gave a tokenizer with {len(tokenizer)} tokens")
        vae = (AutoencoderKL.from_pretrained(directory, subfolder="vae", torch_dtype=dtype, **load)
               if (directory / "vae").is_dir() else None)
        return cls(unet=UNet2DConditionModel.from_pretrained(directory, subfolder="unet", torch_dtype=dtype, **load),
                   text_encoder=CLIPTextModel.from_pretrained(directory, subfolder="text_encoder", dtype=dtype, **load),
                   tokenizer=tokenizer, vae=vae, device=device, dtype=dtype,
                   scheduler_config=dict(DDPMScheduler.load_config(directory, subfolder="scheduler", **load)))

    @property
    def latent(self) -> bool:
        """True for a latent-diffusion model (samples are VAE latents)."""
        return self.vae is not None

    # --- text -------------------------------------------------------------------------------------------
    def text_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """Encoder hidden states [P, L, D] of ``prompts`` (L = max tokens), cached per prompt."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._embeddings]
        if new:
            tokens = self.tokenizer(new, padding="max_length", max_length=self.max_tokens, truncation=True,
                                    return_tensors="pt")
            mask = (tokens.attention_mask.to(self.device)
                    if getattr(self.text_encoder.config, "use_attention_mask", False) else None)
            with torch.no_grad():
                hidden = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
            self._embeddings.update(zip(new, hidden))
        return torch.stack([self._embeddings[p] for p in prompts])

    def conditioning(self, prompts: str | Sequence[str]) -> Conditioning:
        """The conditioning of a batch on ``prompts``: one prompt (shared by the batch) or one per sample."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
        return Conditioning(self.text_embeddings(prompts))

    # --- denoising --------------------------------------------------------------------------------------
    def eps(self, x: Tensor, sigma: Tensor, embeddings: Tensor, adapters: bool = False,
            camera: Tensor | None = None) -> Tensor:
        """VE ε̂(x̂, σ | text) for x̂ [N, C, H, W] on ``prior.device`` (any float dtype; the result has
        x's dtype), σ [N], embeddings [1 or N, L, D].

        UNet input ``z = α x̂``, ``α = 1/√(1+σ²)``, timestep ``schedule.timestep(σ)``; v-prediction is
        converted by ``ε = s z + α v`` with ``s = σ α``. ``adapters``: run with the LoRA enabled.
        ``camera`` [1 or N, K]: the LoRA's camera condition, only with ``adapters`` and a LoRA added with
        ``camera_dim = K``; the UNet's time embedding then gets ``+ E_φ(camera)`` for this forward alone.
        None (also on a camera-conditioned LoRA): no camera term.
        """
        sigma = as_sigma(sigma, x)
        if x.ndim != 4 or x.shape[1] != self.sample_shape[0]:
            raise ValueError(f"denoiser input must be [N, {self.sample_shape[0]}, H, W] (native size "
                             f"prior.sample_shape = {self.sample_shape}), got {tuple(x.shape)}")
        if embeddings.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"prompts: got {embeddings.shape[0]} prompts for a batch of {x.shape[0]} samples; "
                             "pass one prompt or one per sample")
        if camera is not None:
            camera = self._check_camera(camera, x.shape[0], adapters)
        self._set_adapters(adapters)
        alpha = per_sample(1.0 / torch.sqrt(1.0 + sigma.double() ** 2), x).to(x.dtype)
        z = alpha * x
        timestep = self.schedule.timestep(sigma.detach().cpu()).to(self.device, torch.float32)
        states = embeddings.expand(x.shape[0], -1, -1).to(self.dtype)
        sample = z.to(self.dtype).contiguous(memory_format=self.memory_format)
        self._call_camera = camera
        try:
            output = self.unet(sample, timestep, encoder_hidden_states=states).sample
        finally:
            self._call_camera = None  # never leaks into the next forward
        output = output.to(x.dtype).contiguous()
        if self.prediction_type == "v_prediction":
            return per_sample(sigma, x) * alpha * z + alpha * output
        return output

    def _check_camera(self, camera: Tensor, batch: int, adapters: bool) -> Tensor:
        """``camera`` as float32 on the prior's device, after checking it fits the call."""
        if not adapters:
            raise ValueError("camera: only the LoRA view (adapters=True) is camera-conditioned; the frozen prior "
                             "takes no camera (pass camera=None)")
        if self.camera_embedding is None:
            raise ValueError("camera: this prior's LoRA has no camera embedding; add it with "
                             "prior.add_lora(..., camera_dim=K) or pass camera=None")
        width = self.camera_embedding.linear_1.in_features
        if camera.ndim != 2 or camera.shape[0] not in (1, batch) or camera.shape[1] != width:
            raise ValueError(f"camera must be [1 or {batch}, {width}] for a batch of {batch} samples (the LoRA's "
                             f"camera_dim = {width}), got {tuple(camera.shape)}")
        return camera.to(self.device, torch.float32)

    def _add_camera_embedding(self, module: nn.Module, inputs, output: Tensor) -> Tensor:
        """Forward hook on ``unet.time_embedding``: ``emb + E_φ(camera)`` while :meth:`eps` runs a camera, the
        camera rows broadcast (1) or tiled (a stacked [x; x] batch) to the UNet's batch."""
        camera = self._call_camera
        if camera is None:
            return output
        batch, rows = output.shape[0], camera.shape[0]
        if batch % rows:
            raise ValueError(f"camera: {rows} rows do not tile the UNet batch of {batch}")
        embedding = self.camera_embedding(camera)
        if rows != batch:
            embedding = embedding.repeat(batch // rows, 1)
        return output + embedding.to(output.dtype)

    def denoiser(self, guidance_scale: float = 1.0, interval: tuple[float, float] | None = None) -> Denoiser:
        """The text-conditional prior with CFG ``ε̂_u + w (ε̂_c − ε̂_u)`` against "" at ``w = guidance_scale`` on
        σ ∈ ``interval`` (None: all σ). Unbound: each call's conditioning binds it (``.condition(cond)``)."""
        conditional = PromptDenoiser(self)
        if guidance_scale == 1.0:
            return conditional
        return CFGDenoiser(conditional, self.unconditional_denoiser(), guidance_scale, interval)

    def unconditional_denoiser(self) -> "PromptDenoiser":
        """The prior at the empty prompt, whatever the call's conditioning (CFG's guide)."""
        return PromptDenoiser(self, self.conditioning("").embeddings, unconditional=True)

    def in_data_range(self, x: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
        """ε̂ whose clean estimate lies in the data range: ``(x − P(x − σ ε̂))/σ`` with ``P`` =
        :meth:`CleanRange.project` of the scheduler config (``eps`` unchanged when the config sets none, as for
        Stable Diffusion's latents). The one place every view of the prior (prompt, CFG, LoRA) applies it, after
        CFG, so SDS, VSD, SDI, MSD's samplers and the DDIM reference all see the same model."""
        if self.clean_range is None:
            return eps
        s = per_sample(as_sigma(sigma, x), x)
        return (x - self.clean_range.project(x - s * eps)) / s

    # --- LoRA (VSD's particle model ε̂_φ) ----------------------------------------------------------------
    def add_lora(self, rank: int = 4, alpha: float | None = None, target_modules: Sequence[str] = LORA_TARGETS,
                 generator: torch.Generator | None = None, adapter_name: str = "particles",
                 camera_dim: int | None = None) -> list[nn.Parameter]:
        """Add a PEFT LoRA (``unet.add_adapter``) of ``rank`` and scale ``alpha/rank`` (alpha default:
        rank) to the UNet; returns its parameters, kept in float32 for training even on a float16 UNet.
        ``B = 0`` so the adapted model starts equal to the prior; ``A ~ U(±1/√fan_in)`` is drawn from
        ``generator`` (on ``prior.device``). The adapter is enabled only inside :meth:`lora_denoiser` views (PEFT's
        enable/disable also switches the LoRA parameters' ``requires_grad``).

        ``camera_dim`` K: also condition the LoRA view on the camera, as ProlificDreamer/threestudio do for
        text-to-3D: a diffusers ``TimestepEmbedding(K, time_embed_dim)`` E_φ (Linear, SiLU, Linear; float32, on
        ``prior.device``) whose output is added to the UNet's time embedding, ``emb = time_embedding(t) +
        E_φ(camera)``, in LoRA views given a camera (``Conditioning.camera``, [N or 1, K], e.g. the flattened 4×4
        camera_to_world) and nowhere else. Its first layer is drawn like nn.Linear's default, ``U(±1/√K)``, from
        ``generator`` after A; its last layer is zero, so that ε̂_φ starts equal to the prior, like B = 0
        (threestudio leaves it at PyTorch's random init). Its parameters are part of :meth:`lora_parameters`, so
        they train and checkpoint with the LoRA. A LoRA view without a camera adds no camera term (threestudio's
        dropped condition is a zero camera instead: pass zeros for that)."""
        from peft import LoraConfig

        if self._lora is not None:
            raise ValueError(f"the prior already has the LoRA adapter {self._lora!r}")
        if rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {rank}")
        if camera_dim is not None and (isinstance(camera_dim, bool) or int(camera_dim) != camera_dim
                                       or camera_dim < 1):
            raise ValueError(f"camera_dim must be null or an integer >= 1 (16: a flattened camera_to_world), "
                             f"got {camera_dim!r}")
        config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, init_lora_weights=True,
                            target_modules=list(target_modules))
        with torch.random.fork_rng(devices=[]):  # PEFT initialises A from the global RNG: keep it untouched
            self.unet.add_adapter(config, adapter_name=adapter_name)
        self._lora, self._adapters_on = adapter_name, True
        with torch.no_grad():
            for name, parameter in self.unet.named_parameters():
                if f".lora_A.{adapter_name}." in name:
                    draw = torch.rand(parameter.shape, generator=generator, dtype=torch.float32, device=self.device)
                    parameter.data = (2 * draw - 1) / math.sqrt(parameter.shape[1])
        for parameter in self.lora_parameters():
            parameter.data = parameter.data.float()
        if camera_dim is not None:
            self.camera_embedding = self._camera_embedding(int(camera_dim), generator)
            self.unet.time_embedding.register_forward_hook(self._add_camera_embedding)
        self._set_adapters(False)
        return self.lora_parameters()

    def _camera_embedding(self, camera_dim: int, generator: torch.Generator | None) -> nn.Module:
        """E_φ = TimestepEmbedding(camera_dim, time_embed_dim): first layer ``U(±1/√camera_dim)`` from
        ``generator`` (built on the meta device, so nothing draws from the global RNG), last layer zero."""
        from diffusers.models.embeddings import TimestepEmbedding

        width = self.unet.time_embedding.linear_2.out_features
        with torch.device("meta"):
            embedding = TimestepEmbedding(camera_dim, width)
        embedding = embedding.to_empty(device=self.device).float()
        with torch.no_grad():
            bound = 1.0 / math.sqrt(camera_dim)
            for parameter in (embedding.linear_1.weight, embedding.linear_1.bias):
                draw = torch.rand(parameter.shape, generator=generator, dtype=torch.float32, device=self.device)
                parameter.copy_((2 * draw - 1) * bound)
            embedding.linear_2.weight.zero_()
            embedding.linear_2.bias.zero_()
        return embedding.requires_grad_(True).train()

    def lora_parameters(self) -> list[nn.Parameter]:
        """The LoRA adapter's parameters, then its camera embedding's (empty before :meth:`add_lora`)."""
        if self._lora is None:
            return []
        tag = f".{self._lora}."
        parameters = [p for name, p in self.unet.named_parameters() if ".lora_" in name and tag in name]
        if self.camera_embedding is not None:
            parameters += list(self.camera_embedding.parameters())
        return parameters

    def lora_denoiser(self) -> "LoRADenoiser":
        """ε̂_φ: the LoRA-adapted UNet (no CFG), conditioned per call; ``.parameters()`` = the LoRA."""
        if self._lora is None:
            raise ValueError("the prior has no LoRA adapter: call prior.add_lora(...) first")
        return LoRADenoiser(self)

    def _set_adapters(self, enabled: bool) -> None:
        if enabled and self._lora is None:
            raise ValueError("the prior has no LoRA adapter: call prior.add_lora(...) first")
        if self._lora is not None and enabled != self._adapters_on:
            if enabled:
                self.unet.enable_adapters()
            else:
                self.unet.disable_adapters()
            self._adapters_on = enabled

    # --- image space ------------------------------------------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        """Images [N, C, H, W] in [−1, 1] → model samples: (VAE posterior mean − shift)·scaling_factor
        for a latent model (deterministic, differentiable), the images themselves for a pixel model."""
        if images.ndim != 4 or images.shape[1] != self.image_channels:
            raise ValueError(f"images must be [N, {self.image_channels}, H, W] in [-1, 1], got {tuple(images.shape)}")
        if self.vae is None:
            return images
        latents = self.vae.encode(images.to(self.device, self.dtype)).latent_dist.mean
        shift = self.vae.config.shift_factor or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).to(images.dtype)

    def decode(self, samples: Tensor) -> Tensor:
        """Model samples [N, *sample_shape] → images [N, C, H·f, W·f], nominally in [−1, 1] (not clamped)."""
        if samples.ndim != 4 or samples.shape[1] != self.sample_shape[0]:
            raise ValueError(f"samples must be [N, {self.sample_shape[0]}, h, w], got {tuple(samples.shape)}")
        if self.vae is None:
            return samples
        latents = samples / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        return self.vae.decode(latents.to(self.device, self.dtype)).sample.to(samples.dtype)


@dataclass(frozen=True)
class CleanRange:
    """The data range of a pixel-space model's clean estimates, as its diffusers scheduler config declares it
    (``clip_sample`` / ``clip_sample_range``, or ``thresholding`` with ``dynamic_thresholding_ratio`` and
    ``sample_max_value``, the DDPM/DDIM schedulers' options). :meth:`project` maps a clean estimate D [N, ...]
    into that range exactly as the schedulers treat ``pred_original_sample``: clip to ``[−r, r]``, or per sample
    ``s = clamp(quantile_ratio(|D|), 1, sample_max_value)``, ``D ← clamp(D, −s, s)/s``.

    Why it is sound: the ideal denoiser ``E[y | x_σ]`` is a mean of data, so it lies in the data's range; clipping
    each coordinate into ``[−r, r]`` never moves it further from any value in that range.
    """

    mode: str  # "clip" | "threshold"
    limit: float  # clip: r; threshold: sample_max_value
    ratio: float = 1.0  # threshold: the quantile of |D| per sample

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "CleanRange | None":
        if config.get("thresholding", False):
            return cls("threshold", float(config.get("sample_max_value", 1.0)),
                       float(config.get("dynamic_thresholding_ratio", 0.995)))
        if config.get("clip_sample", False):
            return cls("clip", float(config.get("clip_sample_range", 1.0)))
        return None

    def project(self, clean: Tensor) -> Tensor:
        if self.mode == "clip":
            return clean.clamp(-self.limit, self.limit)
        flat = clean.flatten(1).abs().float()
        s = torch.quantile(flat, self.ratio, dim=1).clamp(1.0, self.limit).to(clean.dtype)
        s = per_sample(s, clean)
        return torch.maximum(torch.minimum(clean, s), -s) / s


class PromptDenoiser(Denoiser):
    """The prior at text embeddings [1 or N, L, D]; adapters disabled. ``embeddings`` None: unbound, bound per
    call by :meth:`condition`. ``unconditional``: CFG's empty-prompt guide, which keeps its embeddings whatever
    the call's conditioning. The frozen prior is not camera-conditioned: this view ignores ``cond.camera``."""

    vp = True
    adapters = False

    def __init__(self, prior: DiffusersPrior, embeddings: Tensor | None = None, unconditional: bool = False,
                 camera: Tensor | None = None):
        self.prior, self.embeddings, self.unconditional = prior, embeddings, unconditional
        if camera is not None and not self.adapters:
            raise ValueError("camera: only the LoRA view (prior.lora_denoiser()) is camera-conditioned")
        self.camera = camera

    @property
    def noise_schedule(self) -> VPSchedule:
        return self.prior.schedule

    def condition(self, cond: Conditioning | None) -> "PromptDenoiser":
        if self.unconditional or cond is None:
            return self
        return type(self)(self.prior, cond.embeddings, camera=cond.camera if self.adapters else None)

    def eps(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.embeddings is None:
            raise ValueError("the prior's denoiser has no conditioning: pass the step's conditioning to the guidance "
                             "(guidance(x, step, generator, cond=prior.conditioning(prompts))) or bind it with "
                             "denoiser.condition(cond)")
        camera = {} if self.camera is None else {"camera": self.camera}  # None: the call exactly as before cameras
        eps = self.prior.eps(x, sigma, self.embeddings, adapters=self.adapters, **camera)
        return self.prior.in_data_range(x, sigma, eps)


class LoRADenoiser(PromptDenoiser):
    """ε̂_φ for VSD: the same conditioning with the LoRA adapter enabled; trains only the LoRA (and its camera
    embedding). Bound, it keeps the call's ``cond.camera`` (None: no camera term)."""

    adapters = True

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.prior.lora_parameters())


class CFGDenoiser(GuidedDenoiser):
    """:class:`GuidedDenoiser` of two prompt views of one prior, evaluated in ONE UNet forward on the
    stacked batch ``[x; x]`` with ``[cond; uncond]`` embeddings. Same result (and constructor) as the
    generic combinator, half the launches."""

    def __init__(self, main: PromptDenoiser, guide: PromptDenoiser, scale: float,
                 interval: tuple[float, float] | None = None):
        if main.prior is not guide.prior or main.adapters != guide.adapters:
            raise ValueError("CFGDenoiser needs two prompt views of the same prior with the same adapter state")
        super().__init__(main, guide, scale, interval)

    def eps(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = as_sigma(sigma, x)
        active = torch.ones_like(sigma, dtype=torch.bool)
        if self.interval is not None:
            active = (sigma >= self.interval[0]) & (sigma <= self.interval[1])
        if self.scale == 1.0 or not bool(active.any()) or self.main.embeddings is None:
            return self.main.eps(x, sigma)  # (unbound: raises, saying how to condition)
        n = x.shape[0]
        embeddings = torch.cat([self.main.embeddings.expand(n, -1, -1), self.guide.embeddings.expand(n, -1, -1)])
        camera = {}  # a pair of camera-conditioned LoRA views: [main; guide] cameras, like the embeddings
        if self.main.camera is not None or self.guide.camera is not None:
            if self.main.camera is None or self.guide.camera is None:
                raise ValueError("camera: a CFG pair of LoRA views runs one forward, so both views need a camera "
                                 "or neither (give the guide a zero camera for threestudio's dropped condition)")
            camera = {"camera": torch.cat([self.main.camera.expand(n, -1), self.guide.camera.expand(n, -1)])}
        both = self.main.prior.eps(torch.cat([x, x]), torch.cat([sigma, sigma]), embeddings, self.main.adapters,
                                   **camera)
        eps_main, eps_guide = both[:n], both[n:]
        w = per_sample(torch.where(active, torch.full_like(sigma, self.scale), torch.ones_like(sigma)), x)
        return self.main.prior.in_data_range(x, sigma, eps_guide + w * (eps_main - eps_guide))
