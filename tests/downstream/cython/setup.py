"""Build dense_ops, a downstream extension that cimports cnn_core's C-level API.

No include folders and no libraries: the cimported functions are found through the
installed cnn_core.kernels extension when dense_ops is imported.
"""
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    name="cnn_core_downstream_cython",
    ext_modules=cythonize([Extension("dense_ops", ["dense_ops.pyx"])]),
)
