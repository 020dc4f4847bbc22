"""The loraplex console: a Streamlit app over the gateway's HTTP API."""
