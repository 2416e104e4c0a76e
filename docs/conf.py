"""Sphinx configuration of the mlsubtomo documentation."""

import mlsubtomo

project = "mlsubtomo"
author = "mlsubtomo developers"
copyright = "mlsubtomo developers"
release = mlsubtomo.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "matplotlib.sphinxext.plot_directive",
    # Only to render the Markdown tables that the benchmark scripts write.
    "myst_parser",
]

exclude_patterns = ["_build"]
# The documents are reStructuredText; Markdown files are only ever included.
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
default_role = "literal"

# autodoc and numpydoc
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the numpydoc Parameters sections already give the types
autosummary_generate = False  # summary tables only; the API pages are written by hand
numpydoc_show_class_members = False  # members are documented by autodoc itself
numpydoc_class_members_toctree = False
numpydoc_validation_checks = set()

# plot directive: one PNG per figure, no source or format links
plot_basedir = "_scripts"
plot_formats = [("png", 100)]
plot_html_show_source_link = False
plot_html_show_formats = False
plot_include_source = False

html_theme = "alabaster"
html_static_path = []
html_title = f"mlsubtomo {release}"

# kernel.py writes the set size as |O_i| in a docstring, which reStructuredText
# reads as a substitution; this renders it as the text it is.
rst_epilog = """
.. |O_i| replace:: \\|O_i\\|
"""


def _skip_routing_setters(app, what, name, obj, skip, options):
    # scikit-learn generates set_fit_request and friends on every estimator; their
    # docstrings point into scikit-learn's own documentation, and the routing they
    # do is described in the user guide instead.
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_routing_setters)
