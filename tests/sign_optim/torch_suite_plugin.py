"""A pytest plugin (``-p tests.sign_optim.torch_suite_plugin``): registers AddSign and PowerSign in torch's
``optim_db`` before torch's ``test_optim.py`` is collected (:mod:`tests.sign_optim.optim_infos`)."""

from tests.sign_optim.optim_infos import register

register()
