# Seed 002's Python example (shared/seeds/002_72d9dcbfeb078697.txt), verbatim. The test
# changes only the URL and the subscription key.
import requests

url = "https://gateway.pixazo.ai/auraflow-v0-3-512/v1/auraflow-v0-3-request"
headers = {
    "Content-Type": "application/json",
    "Cache-Control": "no-cache",
    "Ocp-Apim-Subscription-Key": "YOUR_SUBSCRIPTION_KEY",
}
data = {
    "prompt": "Close-up portrait of a majestic iguana with vibrant blue-green scales, piercing amber eyes, and orange spiky crest. Intricate textures and details visible on scaly skin. Wrapped in dark hood, giving regal appearance. Dramatic lighting against black background. Hyper-realistic, high-resolution image showcasing the reptiles expressive features and coloration.",
    "num_images": 1,
    "guidance_scale": 3.5,
    "num_inference_steps": 50,
    "expand_prompt": True,
}
response = requests.post(url, json=data, headers=headers)
print(response.json())
