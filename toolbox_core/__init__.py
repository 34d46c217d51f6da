"""The ground floor of the toolbox: helpers every library shares, importing none of them (and no torch).

* `toolbox_core.checks`: argument checks, one helper per kind (`as_int`, `as_real`, `as_bool`, `as_choice`), pure
  Python;
* `toolbox_core.validation`: those checks plus the data checks of tensors and their global switch
  (`set_data_checks`; torch is imported by the functions that read tensors, not by the module);
* `toolbox_core.files`: atomic writes of a file (`atomic_write`) and of a whole directory (`publish_directory`,
  one writer at a time): a temporary name, then a rename.

The ListOps data code, which only the ListOps recipes, task and benchmark use, moved up to its own torch-free
package, `listops_data`; ``toolbox_core.listops`` still names it (a deprecated alias module, resolved only when imported:
importing `toolbox_core` does not import `listops_data`).

The libraries (`admin_torch`, `reinmax`, `sign_optim`) import from here; the feature packages above them
(`stability_toolbox`, the monitor; `fairseq_plugins`) import from the libraries. `tests/packaging/test_import_graph.py`
checks that no import runs upward or in a circle.
"""

__all__ = ["checks", "files", "validation"]
