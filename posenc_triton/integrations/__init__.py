"""Integrations of posenc_triton with other libraries.

Each integration lives in its own submodule and imports its library only when used, so
``import posenc_triton.integrations`` never pulls in an optional dependency:

* :mod:`posenc_triton.integrations.transformers` — a fused drop-in for Hugging Face
  transformers' ``apply_rotary_pos_emb`` (Llama, Mistral, Qwen2 and the other models that
  share it) and ``patch_rope`` / ``unpatch_rope`` to install it. Needs the ``hf`` extra:
  ``pip install 'posenc-triton[hf]'``.
"""
