"""Builds runtime._native, the C extension for the runtime's hot CPU paths.

Plain C99 against the CPython API and the buffer protocol: no numpy headers, no special
compiler flags, so the same source builds on x86_64 and aarch64 (Jetson).
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "runtime._native",
            sources=["runtime/_native/native.c"],
            extra_compile_args=["-O3", "-std=c99"],
        )
    ]
)
