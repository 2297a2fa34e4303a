# The MLflow tracking server of infra/compose.yaml: the official image of the MLflow the project pins, plus
# the PostgreSQL driver (backend store) and boto3 (S3 artifact store), both pinned.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.11 boto3==1.40.61
