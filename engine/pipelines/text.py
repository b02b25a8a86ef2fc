"""Prompts + images -> prompt embeddings with the snapshot's Qwen2.5-VL, as its pipeline encodes them."""
import torch
from PIL import Image

from loaders import LoadError, Snapshot, torch_dtype

from engine.pipelines import pipeline_for
from engine.pipelines.edit import SPEC as EDIT
from engine.vram.offload import move_except, stream_blocks


def encode_text(model_dir, images, prompts, device="cpu", dtype="float32", area=1024 * 1024, resize="pil",
                plan=None, text_weights=None, text_encoder_file=None, notes=None):
    """Prompts -> list of ([1, L_i, D] embeddings, [1, L_i] mask), one per prompt, from the snapshot's
    text_encoder/ + processor/. images: one PIL image or a list (the pipeline's template names them in
    order); the VL model sees each at the pipeline's size. The text encoder is loaded for this call only
    and freed afterwards (it is ~16 GB in bf16); with a plan, its layers beyond the plan's resident counts
    stream from pinned host memory. text_weights, text_encoder_file, notes: as load_text_model."""
    return encode_texts(model_dir, [(images, prompts)], device, dtype, area, resize, plan, text_weights,
                        text_encoder_file, notes)[0]


def encode_texts(model_dir, jobs, device="cpu", dtype="float32", area=1024 * 1024, resize="pil", plan=None,
                 text_weights=None, text_encoder_file=None, notes=None):
    """encode_text for many (images, prompts) jobs with one load of the text encoder."""
    from engine.text.processor import load_processor
    snap = Snapshot(model_dir)
    spec = pipeline_for(snap)
    snap.require("text_encoder")
    processor = load_processor(snap, resize=resize)
    te = load_text_model(snap, dtype, device, text_weights, text_encoder_file, plan, notes=notes)
    try:
        return run_text_encoder(processor, te, jobs, device, area, plan, spec)
    finally:
        del te      # ~16 GB: gone before the transformer loads
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()


def load_text_model(snap, dtype, device, text_weights=None, file=None, plan=None, lm_head=False, notes=None):
    """The text encoder where it runs: on `device`, or on the host when a plan streams it. file: its weights from
    one .safetensors (engine.models.text_encoder.load_text_encoder; an fp8 file's language-model Linears stay
    fp8). text_weights="fp8": the language model's layer Linears quantized to float8_e4m3fn on load
    (engine.transforms.fp8.quantize_text_encoder_fp8), on the host one layer at a time (the arithmetic on
    `device`), so the full-width model never reaches the GPU; "bf16": an fp8 file dequantized to `dtype`;
    None: as the checkpoint holds them. notes: a list the load's one-line notes are appended to."""
    from engine.models.text_encoder import load_text_encoder
    if text_weights not in (None, "bf16", "fp8"):
        raise LoadError(f"unknown text weights {text_weights!r}; use bf16 or fp8")
    host = plan is not None or text_weights == "fp8"
    te = load_text_encoder(snap, torch_dtype(dtype), "cpu" if host else device, lm_head, file, text_weights)
    if notes is not None and te.source is not None:
        from loaders.text_encoder_file import summary
        notes.append(summary(te.source))
    if text_weights == "fp8":
        from engine.transforms.fp8 import quantize_text_encoder_fp8
        n = quantize_text_encoder_fp8(te, compute_device=device)    # float32 work per layer on `device`
        if notes is not None and n:
            notes.append(f"fp8: {n} text-encoder Linears quantized to float8_e4m3fn on load "
                         "(one scale per output channel)")
    if plan is not None:
        check_streamable(te, file)
    elif host:
        te = te.to(device)
    return te


def check_streamable(te, file):
    """Streaming moves every LM layer through the same slots, so the layers must be alike: a file whose layers mix
    fp8 and bf16 Linears is refused under a plan with the flags that make them alike."""
    kinds = {tuple((n, type(m).__name__) for n, m in layer.named_modules()) for layer in te.layers}
    if len(kinds) > 1:
        raise LoadError(f"{file}: its language-model layers mix fp8 and bf16 Linears, and a --vram plan streams "
                        "identical layers; add --text-weights fp8 (quantizes the rest) or --text-weights bf16")


def prompt_images(spec, images, area=1024 * 1024):
    """The images as the pipeline hands them to the VL processor: Lanczos-resized to its VL size."""
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    spec.check_images(len(images))
    sizes = spec.vl_sizes([im.size for im in images], area)
    return [im.resize(size, resample=Image.LANCZOS) for im, size in zip(images, sizes)]


def run_text_encoder(processor, te, jobs, device, area=1024 * 1024, plan=None, spec=EDIT, streamed=False):
    """encode_texts with a built text encoder (on `device`, or on the host when a plan streams it). With a
    plan, the streamed layers' hooks and pinned host buffers are released before returning (errors too);
    the caller drops `te` to free its device memory. streamed=True: the caller has already placed `te` (the
    same stream_blocks/move_except calls as below, made once and kept, as the warm server does): nothing is
    streamed or released here."""
    from engine.models.text_encoder import encode_prompts
    handles = []
    try:
        if plan is not None and not streamed:
            handles.append(stream_blocks(te.layers, device, plan.te_resident, skip=()))
            handles.append(stream_blocks(te.visual.blocks, device, plan.vision_resident, skip=()))
            # the 1.1 GB embedding table stays on the host: a lookup of a few thousand rows, copied over
            move_except(te, device, te.layers, te.visual.blocks, te.embed_tokens)
        results = []
        for images, prompts in jobs:
            vl = prompt_images(spec, images, area)
            if vl:
                embeds, mask = encode_prompts(processor, te, prompts, vl, spec.template(len(vl)))
            else:
                embeds, mask = encode_text_prompts(processor, te, prompts, spec.template(0), spec.drop)
            results.append([(embeds[i:i + 1, :int(mask[i].sum())].cpu(), mask[i:i + 1, :int(mask[i].sum())].cpu())
                            for i in range(len(prompts))])
    finally:
        for h in handles:  # unpin the host buffers before the transformer pins its own
            h.remove()
    return results


@torch.no_grad()
def encode_text_prompts(processor, te, prompts, template, drop):
    """Prompts with no image (Qwen-Image's text-to-image template) -> (embeds [B, L, D], mask [B, L] int64):
    each row's valid hidden states minus the first `drop` template tokens, right-padded with zeros, as the
    reference's _get_qwen_prompt_embeds. (encode_prompts does the same with images and 64 dropped.)"""
    from engine.models.text_encoder import pack_rows
    ids, mask = processor.tokenize(list(prompts), [], template)
    ids, lengths, _ = pack_rows(ids, mask)
    hidden = te.forward_packed(ids, lengths)
    keep = (lengths - drop).to(hidden.device)                       # [B]
    width = int(keep.max())
    mask = (torch.arange(width, device=hidden.device)[None] < keep[:, None]).to(torch.int64)
    return hidden[:, drop:drop + width].masked_fill(mask[..., None] == 0, 0), mask


def prompt_tokens(processor, spec, prompts, vl):
    """(MMDiT text tokens of the longest prompt, VL image tokens) of prompts + the VL-resized images, from
    the tokenizer and the image preprocessing alone."""
    if not vl:
        _, mask = processor.tokenize(list(prompts), [], spec.template(0))
        return int(mask.sum(1).max()) - spec.drop, 0
    inputs = processor(list(prompts), vl, spec.template(len(vl)))
    n_image = int(inputs["image_grid_thw"].prod(-1).sum()) // processor.image_cfg.merge_size ** 2
    return int(inputs["attention_mask"].sum(1).max()) - spec.drop, n_image
