"""cnn_core's thread pool as a library threadpoolctl controls.

The kernels run on cnn_core's own thread pool, which threadpoolctl would not see by
itself.  When threadpoolctl is installed, importing cnn_core registers a
controller for the compiled extension: ``threadpool_info()`` lists it (user_api
"cnn_core") and ``threadpool_limits(n)`` caps the default thread count, as it does for
OpenMP and BLAS libraries.
"""


def register_with_threadpoolctl():
    """Register the controller; a no-op without threadpoolctl (or one older than 3.5)."""
    try:
        import threadpoolctl
    except ImportError:
        return False
    if not hasattr(threadpoolctl, "register") or not hasattr(threadpoolctl, "LibController"):
        return False

    class CnnCoreController(threadpoolctl.LibController):
        """The limit behind cnn_max_threads() in the cnn_core.kernels extension."""

        user_api = "cnn_core"
        internal_api = "cnn_core"
        filename_prefixes = ("kernels",)
        check_symbols = ("cnn_set_max_threads", "cnn_max_threads")

        def get_num_threads(self):
            return self.dynlib.cnn_max_threads()

        def set_num_threads(self, num_threads):
            self.dynlib.cnn_set_max_threads(int(num_threads))

        def get_version(self):
            from . import __version__
            return __version__

    threadpoolctl.register(CnnCoreController)
    return True
