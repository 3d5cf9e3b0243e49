// Seed 000's Node example (../../../../shared/seeds/000_9807d8cae824524b.txt), kept as
// published. Its gaps are completed in the obvious way: the url, `axios.post(url, formData,
// {headers})` (with responseType arraybuffer so the image bytes survive), a console.log of
// the status and headers, and the image written to a file. The test changes only the URL
// and the key.
const axios = require('axios');
const FormData = require('form-data');
const fs = require('fs');

const api_key = "YOUR API-KEY";
const url = "https://YOUR-AURASERVE-HOST/v1/aura-flow";

const reqBody = {
  "cfg": 5,
  "seed": 2425367,
  "shift": 1.73,
  "steps": 25,
  "width": 1024,
  "height": 1024,
  "prompt": "A mesmerizing 3D render displaying a vibrant, dark fantasy-inspired birthday message for Mehtap. The letters 'Happy birthday' are written in a dreamy, pastel-colored cursive script, floating elegantly above a gradient background that transitions seamlessly from deep purple to soft pink. The dreamy atmosphere is accentuated by a vibrant swirling array of decorative elements, including a rainbow, heart-shaped objects in various sizes and textures, twinkling stars, and a collection of colorful, abstract shapes. The overall design pays homage to Ukiyo-e and graffiti art, creating a unique and captivating visual experience., 3d render, graffiti, vibrant, dark fantasy, typography, ukiyo-e, conceptual art",
  "sampler": "uni_pc",
  "scheduler": "normal",
  "output_format": "webp",
  "output_quality": 80,
  "number_of_images": 1
};

(async function() {
  try {
    const formData = new FormData();

    // Append regular fields
    for (const key in reqBody) {
      if (reqBody.hasOwnProperty(key)) {
        formData.append(key, reqBody[key]);
      }
    }

    // Convert and append images as Base64 if necessary

    const response = await axios.post(url, formData, {
      headers: {
        'x-api-key': api_key,
        ...formData.getHeaders()
      },
      responseType: 'arraybuffer'
    });

    console.log(JSON.stringify({ status: response.status, headers: response.headers }));
    fs.writeFileSync(process.env.OUTPUT_FILE || 'output.webp', response.data);
  } catch (error) {
    console.error('Error:', error.response ? error.response.status : error.message);
    process.exitCode = 1;
  }
})();
