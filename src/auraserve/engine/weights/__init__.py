"""AuraFlow weights as their users hold them: one module per layout.

* `probe`: torch-free. Reads a file's header only (safetensors' JSON header, GGUF's metadata)
  and says what it holds: format, layout, prefix, architecture, dtypes, bundled text encoder
  and VAE. `auraserve models inspect` and the loaders share it, so a file is recognised by
  its content, never by its name, and the same way in both places.
* `keymap`: original AuraFlow names ↔ diffusers names, through diffusers' own converter.
* `single_file`: a transformer from one .safetensors file (original, ComfyUI-prefixed or
  diffusers layout; bf16/fp16/fp32, or float8 kept in fp8 storage), streamed tensor by tensor.
* `gguf_file`: a transformer from a GGUF file through diffusers' GGUF quantizer.
* `bundled`: the text encoder and VAE of an all-in-one file.
* `components`: what a file lacks (tokenizer, text encoder, VAE, scheduler, the transformer's
  config) from a diffusers folder or hub id.

This package's `__init__` imports nothing, so `probe` stays importable without torch.
"""
