"""The build_onnx stage (tasks/build_onnx/stage.py: build_onnx, search_quantization) and its helpers.

This file imports nothing. Importing any module of the package runs it, and a cache key covers
every module its code imports (grove/cache.py): a re-export of the stage here would put the whole
stage into the key of the adapter base (base.py), which every fine-tune of a base model shares.
"""
