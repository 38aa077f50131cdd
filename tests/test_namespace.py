"""The package's namespace: ``dir(tl_thoughts)`` lists the public API and the public namespaces
only, and no public name is also the name of a submodule (``tl_thoughts.verify`` is the function;
its module is ``tl_thoughts.verification``)."""

import importlib
import pkgutil

import tl_thoughts

PUBLIC_NAMESPACES = {"analysis", "evaluation", "models", "plots", "stream", "tasks"}


def _submodule_names() -> set[str]:
    return {info.name for info in pkgutil.iter_modules(tl_thoughts.__path__)}


def test_dir_lists_the_public_api_and_namespaces_only():
    # import every internal module first: Python binds each one on the package as it is imported
    for name in _submodule_names():
        if name not in ("cli", "demo"):
            importlib.import_module(f"tl_thoughts.{name}")
    listed = set(dir(tl_thoughts))
    assert listed == set(tl_thoughts.__all__) | PUBLIC_NAMESPACES
    leaked = {n for n in listed if n.startswith("_") and not n.startswith("__")}
    assert not leaked
    internal = _submodule_names() - PUBLIC_NAMESPACES
    assert not (listed & internal), listed & internal
    for name in listed:  # every listed name resolves
        assert getattr(tl_thoughts, name) is not None


def test_no_public_name_is_a_submodule_name():
    clashes = (set(tl_thoughts.__all__) | set(dir(tl_thoughts))) & _submodule_names() - PUBLIC_NAMESPACES
    assert not clashes, clashes
    assert not set(tl_thoughts.__all__) & _submodule_names()


def test_verify_is_the_function_after_its_module_is_imported():
    import tl_thoughts.verification as verification

    assert callable(tl_thoughts.verify) and tl_thoughts.verify is verification.verify
    assert tl_thoughts.verification is verification
    assert tl_thoughts.VerificationReport is verification.VerificationReport
