import pytest

from daemon.client import Client, ClientError, base_url


@pytest.mark.parametrize("host,url", [("", "http://127.0.0.1:11434"), ("0.0.0.0:8080", "http://127.0.0.1:8080"),
                                      ("https://example.com/ollama", "https://example.com:443/ollama"),
                                      ("[::1]:9", "http://[::1]:9")])
def test_base_url(host, url):
    assert base_url(host) == url


def test_errors_carry_the_status_and_message(daemon):
    client = Client(daemon.url)
    with pytest.raises(ClientError) as err:
        client.request("POST", "/api/show", {"model": "nope"})
    assert err.value.status == 404 and err.value.message == "model 'nope:latest' not found"
    with pytest.raises(ClientError) as err:
        list(client.stream("/api/pull", {"model": "nothing-like-this"}))
    assert "file does not exist" in err.value.message
