from openai import OpenAI

client = OpenAI(base_url="http://localhost:8000/v1", api_key="-")
reply = client.chat.completions.create(
    model="french",  # an adapter; GET /v1/models lists the base model and every adapter
    messages=[{"role": "user", "content": "How can I stay healthy in winter?"}],
    max_tokens=32,
)
print(reply.choices[0].message.content)
