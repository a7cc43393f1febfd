"""Integrations of posenc_triton with other libraries.

Each integration lives in its own submodule and imports its library only when used, so
``import posenc_triton.integrations`` never pulls in an optional dependency:

* :mod:`posenc_triton.integrations.transformers` — ``apply(model)`` / ``unpatch(model)`` route
  the RoPE and ALiBi attention of Hugging Face transformers models (Llama, Qwen, Gemma,
  GPT-NeoX, Phi, GPT-J, Cohere, GLM, DeepSeek-V3, BLOOM, MPT, Falcon, ... : its
  ``ARCHITECTURES`` table) through the fused kernels. Needs the ``hf`` extra:
  ``pip install 'posenc-triton[hf]'``.
"""
