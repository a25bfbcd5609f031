# Hydra config tree (see README: 'The config tree'). Importable so installed wheels carry it.
