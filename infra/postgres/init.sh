#!/bin/sh
# First start of the compose PostgreSQL: one database per server (MLflow's backend store, Prefect's API).
set -eu
for database in mlflow prefect; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -c "CREATE DATABASE $database"
done
