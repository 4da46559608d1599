"""The reference model's procedural corpus (captioned synthetic sounds) and its training recipe.

Tooling only: no runtime module imports this package; the model's definition (what the runtime loads)
lives in :mod:`adm_export.models.reference` and :mod:`adm_export.models.reference_components`.
"""
