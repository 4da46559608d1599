"""The stage layer: one runner (:mod:`~adm_export.stages.runner`) that every stage goes through, the
public stage functions (:mod:`~adm_export.stages.api`) and their typed results
(:mod:`~adm_export.stages.results`), and the stages that compose the lower layers: ``build``
(:mod:`~adm_export.stages.build`), ``generate`` (:mod:`~adm_export.stages.generate`) and ``bundle``
(:mod:`~adm_export.stages.bundle`)."""
