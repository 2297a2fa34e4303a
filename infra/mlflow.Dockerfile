# The MLflow tracking server of infra/compose.yaml: the official image plus the PostgreSQL driver and
# boto3 for the S3 artifact store.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.11 boto3==1.40.61
