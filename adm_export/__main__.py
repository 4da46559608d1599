"""``python -m adm_export`` runs the CLI (also under ``torchrun``)."""

from adm_export.cli import main

if __name__ == "__main__":
    main()
