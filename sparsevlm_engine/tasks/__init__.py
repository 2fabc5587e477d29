"""Task folder of the lmms-eval plugin (no tasks of its own).

lmms-eval 0.7.3 adds `<plugin>.tasks` to the task search path for every name in
LMMS_EVAL_PLUGINS and fails when that package does not exist, so the plugin needs it.
"""
