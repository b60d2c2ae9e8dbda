"""Layer kinds, one module each; :data:`KINDS` maps a config ``kind`` to its class.

Each class is built from its config table by ``from_config(options, base_dir)`` and attached
by the engine.
"""
